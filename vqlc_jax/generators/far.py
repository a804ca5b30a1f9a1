"""The FAR family (`config.generator = "far"`): factorized autoregression over the k sub-codebook token maps of a
factorized tokenizer (FQGAN: sub-codebook 1 = visual, 2 = semantic, 3 = ...), and its cached sampler.

Encoded token maps are [k, h, w] per image ([h, w] for a single-codebook tokenizer, k = 1). Training drops labels
to the null class with probability `loss.class_dropout` (classifier-free guidance); the loss is the mean over the k
sub-codebooks of the chunked cross-entropy of each head (`vqlc_jax.losses.chunked_softmax_cross_entropy`), so the
[B, T, V_j] logits never exist at once.

Sampling (`sample_far_tokens`, one compiled `fori_loop` over the T positions): the backbone decodes position t
with its KV cache, then the AR head decodes the k sub-tokens one after the other with its own cache (slots 0..k-1),
each drawn from its guided, filtered logits (`vqlc_jax.generators.sampling`: temperature, top-k, top-p, CFG with
conditional and null rows in one batch, constant or linear schedule). Draw (t, j) uses `fold_in(fold_in(rng, t),
j)`, so a seed gives the same tokens whatever the batch sharding.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax import losses
from vqlc_jax.generators import sampling
from vqlc_jax.generators.family import Family, check_size, drop_labels
from vqlc_jax.models.far import FAR

Array = jax.Array
Choose = Callable[[Array, int, Array], Array]  # (position, sub-codebook, guided logits [B, V_j]) -> tokens [B]


def decode_far(model: FAR, variables: Any, labels: Array, *, num_tokens: int, choose: Choose,
               cfg_scale: float = 1.0, cfg_schedule: str = "constant", trace: bool = False):
    """The cached decoding loop with a token rule: `choose(t, j, logits)` picks sub-token j of position t from the
    guided logits (float32 [B, V_j]). Returns int32 tokens [B, k, num_tokens] and, with `trace`, also
    {"context": [R, T, W] backbone outputs, "raw_j": [R, T, V_j] head logits before guidance, "logits_j": [B, T,
    V_j] guided logits} for j = 1..k (R = 2B rows under guidance: conditional, then null)."""
    sampling.check_request(labels, num_tokens, model.block_size, cfg_schedule)
    guided = cfg_scale != 1.0
    labels = jnp.asarray(labels, jnp.int32)
    batch, k = labels.shape[0], model.num_codebooks
    class_ids = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if guided else labels
    copies = class_ids.shape[0] // batch
    apply = lambda *args, method: model.apply(variables, *args, method=method)  # noqa: E731

    def step(t, carry):
        cache, tokens, record = carry
        previous = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), axis=2, keepdims=False)
        h, cache = apply(class_ids, jnp.tile(previous, (copies, 1)), t, cache, method="context_step")
        x, drawn = h, []
        if trace:
            record = {**record, "context": record["context"].at[:, t].set(h.astype(jnp.float32))}
        for j in range(k):
            raw, cache = apply(x, j, cache, method="head_step")
            raw = raw.astype(jnp.float32)
            logits = sampling.guide(raw, sampling.cfg_scale_at(t, cfg_scale, cfg_schedule, num_tokens)) \
                if guided else raw
            drawn.append(choose(t, j, logits).astype(jnp.int32))
            x = jnp.tile(drawn[-1], copies)
            if trace:
                record = {**record, f"raw_{j + 1}": record[f"raw_{j + 1}"].at[:, t].set(raw),
                          f"logits_{j + 1}": record[f"logits_{j + 1}"].at[:, t].set(logits)}
        return cache, jax.lax.dynamic_update_index_in_dim(tokens, jnp.stack(drawn, 1), t, axis=2), record

    rows = class_ids.shape[0]
    record = {}
    if trace:
        record["context"] = jnp.zeros((rows, num_tokens, model.width), jnp.float32)
        for j, size in enumerate(model.codebook_sizes, 1):
            record[f"raw_{j}"] = jnp.zeros((rows, num_tokens, size), jnp.float32)
            record[f"logits_{j}"] = jnp.zeros((batch, num_tokens, size), jnp.float32)
    tokens = jnp.zeros((batch, k, num_tokens), jnp.int32)
    _, tokens, record = jax.lax.fori_loop(0, num_tokens, step, (model.init_cache(rows), tokens, record))
    return (tokens, record) if trace else tokens


def sample_far_tokens(model: FAR, variables: Any, rng: Array, labels: Array, *, num_tokens: int,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      cfg_scale: float = 1.0, cfg_schedule: str = "constant") -> Array:
    """Sub-token sequences int32 [B, k, num_tokens] for class `labels` [B]: every sub-token drawn from its logits
    after guidance (every sub-codebook's), temperature, top-k and top-p (None: off). Jit it whole with the labels
    sharded over the batch."""
    for size in model.codebook_sizes:
        sampling.check_filters(size, top_k, top_p, temperature)

    def draw(t, j, logits):
        logits = sampling.filter_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature)
        return jax.random.categorical(jax.random.fold_in(jax.random.fold_in(rng, t), j), logits)

    return decode_far(model, variables, labels, num_tokens=num_tokens, choose=draw, cfg_scale=cfg_scale,
                      cfg_schedule=cfg_schedule)


def far_loss(model: FAR, params: Any, labels: Array, tokens: Array, *, chunk_size: int,
             label_smoothing: float = 0.0, dropout_rng: Array | None = None) -> tuple[Array, list[Array]]:
    """(mean of the k cross-entropies, the k terms) of the training forward on labels [B] and tokens [B, k, T]
    (inputs and targets), each term the chunked cross-entropy of `output_j` over its vocabulary; the release's loss
    when `label_smoothing` is 0. `dropout_rng` enables the model's dropout (train mode)."""
    features = model.apply({"params": params}, labels, tokens, train=dropout_rng is not None, method=FAR.features,
                           rngs={} if dropout_rng is None else {"dropout": dropout_rng})
    terms = [losses.chunked_softmax_cross_entropy(
        features[:, :, j].reshape(-1, features.shape[-1]), params[f"output_{j + 1}"]["kernel"],
        tokens[:, j].reshape(-1), chunk_size=chunk_size, label_smoothing=label_smoothing)
        for j in range(model.num_codebooks)]
    return sum(terms) / len(terms), terms


def dataset_codebooks(dataset: Any, config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The sub-codebook sizes of the encoded dataset (or of an exported generator's dataset info, which keeps them
    in its config): checked against `model.num_codebooks` and `model.codebook_sizes` when the config states them."""
    where = str(getattr(dataset, "directory", "")) or "given"
    m = config.model
    shape = tuple(dataset.token_shape)
    k = shape[0] if len(shape) == 3 else 1
    sizes = tuple(getattr(dataset, "codebook_sizes", None) or m.codebook_sizes or (dataset.num_codes,) * k)
    if len(sizes) != k:
        raise ValueError(f"the encoded dataset {where}: token maps {shape} hold {k} sub-codebook(s), its sizes "
                         f"{sizes} name {len(sizes)}")
    if m.num_codebooks and m.num_codebooks != k:
        raise ValueError(f"config.model.num_codebooks={m.num_codebooks} does not match the {k} sub-codebook(s) of "
                         f"the encoded dataset {where} (token maps {list(shape)}; set 0 to read it off the dataset)")
    if m.codebook_sizes and tuple(m.codebook_sizes) != sizes:
        raise ValueError(f"config.model.codebook_sizes={tuple(m.codebook_sizes)} does not match the sub-codebook "
                         f"sizes {sizes} of the encoded dataset {where} (set () to read them off the dataset)")
    return sizes


class FARFamily(Family):
    fields = ("tokens",)

    def __init__(self, config: ml_collections.ConfigDict, dataset):
        self.codebook_sizes = dataset_codebooks(dataset, config)
        check_size(config, "num_classes", dataset.num_classes, str(getattr(dataset, "directory", "")) or "given")
        self.config = config.copy_and_resolve_references()  # with the sizes read off the data (kept on export)
        with self.config.unlocked():
            self.config.model.update(num_codebooks=len(self.codebook_sizes), codebook_sizes=self.codebook_sizes)
        self.num_classes = int(dataset.num_classes)
        self.token_shape = tuple(dataset.token_shape)[-2:]
        self.num_tokens = int(np.prod(self.token_shape))
        m = config.model
        self.model = FAR(codebook_sizes=self.codebook_sizes, num_classes=self.num_classes,
                         block_size=self.num_tokens + 1, num_layers=m.num_layers, num_heads=m.num_heads,
                         width=m.width, head_layers=m.head_layers, dtype=jnp.dtype(m.dtype), remat=m.remat,
                         dropout_rate=m.dropout, zero_head=m.zero_head)

    @property
    def num_codebooks(self) -> int:
        return len(self.codebook_sizes)

    def init_params(self, rng: Array):
        tokens = jnp.zeros((1, self.num_codebooks, self.num_tokens), jnp.int32)
        return self.model.init(rng, jnp.zeros((1,), jnp.int32), tokens)["params"]

    def loss(self, params, batch, rng):
        c = self.config.loss
        tokens = batch["tokens"].reshape(batch["tokens"].shape[0], self.num_codebooks, -1).astype(jnp.int32)
        k_label, k_dropout = jax.random.split(rng)
        labels = drop_labels(k_label, batch["label"], rate=c.class_dropout, null_label=self.num_classes)
        loss, terms = far_loss(self.model, params, labels, tokens, chunk_size=c.chunk_size,
                               label_smoothing=c.label_smoothing, dropout_rng=k_dropout)
        return loss, {"loss": loss, **{f"loss_{j + 1}": term for j, term in enumerate(terms)}}

    def sample(self, params, rng, labels, options):
        tokens = sample_far_tokens(
            self.model, {"params": params}, rng, labels, num_tokens=self.num_tokens,
            temperature=options.temperature, top_k=options.top_k or None,
            top_p=None if options.top_p >= 1.0 else options.top_p, cfg_scale=options.cfg_scale,
            cfg_schedule=options.cfg_schedule)
        return tokens.reshape(-1, self.num_codebooks, *self.token_shape)

    def as_token_maps(self, samples: np.ndarray) -> np.ndarray:
        """Samples as the tokenizer's maps: [B, k, h, w], or [B, h, w] for a single codebook."""
        samples = np.asarray(samples)
        return samples[:, 0] if self.num_codebooks == 1 else samples

    def decode(self, tokenizer, samples):
        return np.asarray(tokenizer.decode(self.as_token_maps(samples)))

    def samples_to_tokens(self, tokenizer, samples):
        return self.as_token_maps(samples)
