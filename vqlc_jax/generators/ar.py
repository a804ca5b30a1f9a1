"""The autoregressive family (`config.generator = "gpt"`): class-conditional GPT over token maps.

Sequence `[N + label, t_0 .. t_{T-1}]` in one id space (codes 0..N-1, class ids N + label, the null class
N + num_classes when `model.null_class`); inputs are the sequence without its last id, targets the T image tokens.
Training corrupts input image tokens as the release (`pkeep`) and, for classifier-free guidance, replaces labels
by the null class with probability `loss.class_dropout`. The loss is the chunked cross-entropy over the head, so
[B, T, V] logits never exist at once (V = N + classes reaches 101,000).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc_jax import losses
from vqlc_jax.generators.family import Family, check_size, drop_labels
from vqlc_jax.models.gpt import GPT

Array = jax.Array


def corrupt_tokens(rng: Array, tokens: Array, *, pkeep: float, vocab_size: int) -> Array:
    """Each token kept with probability `pkeep`, else replaced by an id uniform in [0, vocab_size) (the
    release's `pkeep` trick)."""
    if pkeep >= 1.0:
        return tokens
    k_mask, k_ids = jax.random.split(rng)
    keep = jax.random.bernoulli(k_mask, pkeep, tokens.shape)
    return jnp.where(keep, tokens, jax.random.randint(k_ids, tokens.shape, 0, vocab_size, tokens.dtype))


def build_gpt(config: ml_collections.ConfigDict, *, num_codes: int, num_classes: int, num_tokens: int) -> GPT:
    m = config.model
    return GPT(num_codes=num_codes, num_classes=num_classes, block_size=num_tokens + 1, num_layers=m.num_layers,
               num_heads=m.num_heads, width=m.width, variant=m.variant, null_class=m.null_class,
               dtype=jnp.dtype(m.dtype), remat=m.remat)


class GPTFamily(Family):
    fields = ("tokens",)

    def __init__(self, config: ml_collections.ConfigDict, dataset):
        self.config = config
        where = str(getattr(dataset, "directory", "")) or "given"
        check_size(config, "num_codes", dataset.num_codes, where)
        check_size(config, "num_classes", dataset.num_classes, where)
        self.num_codes, self.num_classes = int(dataset.num_codes), int(dataset.num_classes)
        self.token_shape = tuple(dataset.token_shape)
        self.num_tokens = int(np.prod(self.token_shape))
        self.model = build_gpt(config, num_codes=self.num_codes, num_classes=self.num_classes,
                               num_tokens=self.num_tokens)
        # Corrupting ids: the release draws from its whole vocabulary; LlamaGen's token table holds codes only.
        self.corrupt_vocab = self.model.vocab_size if config.model.variant == "mingpt" else self.num_codes

    def init_params(self, rng: Array):
        idx = jnp.zeros((1, self.num_tokens), jnp.int32)
        return self.model.init(rng, idx)["params"]

    def loss(self, params, batch, rng):
        c = self.config.loss
        tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1).astype(jnp.int32)
        k_label, k_corrupt = jax.random.split(rng)
        labels = drop_labels(k_label, batch["label"], rate=c.class_dropout, null_label=self.num_classes)
        inputs = jnp.concatenate(
            [(self.num_codes + labels)[:, None],
             corrupt_tokens(k_corrupt, tokens[:, :-1], pkeep=c.pkeep, vocab_size=self.corrupt_vocab)], axis=1)
        features = self.model.apply({"params": params}, inputs, train=True, method=GPT.hidden)
        loss = losses.chunked_softmax_cross_entropy(
            features.reshape(-1, features.shape[-1]), params["head"]["kernel"], tokens.reshape(-1),
            chunk_size=c.chunk_size, label_smoothing=c.label_smoothing)
        return loss, {"loss": loss}

    def top_k(self, options: ml_collections.ConfigDict) -> int:
        """`sample.top_k`, where 0 means the paper's 10% of the codes."""
        return options.top_k or max(1, self.num_codes // 10)

    def sample(self, params, rng, labels, options):
        from vqlc_jax.generators import sampling

        tokens = sampling.sample_tokens(
            self.model, {"params": params}, rng, labels, num_tokens=self.num_tokens,
            temperature=options.temperature, top_k=self.top_k(options),
            top_p=None if options.top_p >= 1.0 else options.top_p, cfg_scale=options.cfg_scale)
        return tokens.reshape(-1, *self.token_shape)

    def decode(self, tokenizer, samples):
        return np.asarray(tokenizer.decode(samples))

    def samples_to_tokens(self, tokenizer, samples):
        return np.asarray(samples)
