"""The three visual tokenizers: SEED-style images, HiMTok-style masks, LWM-style video frames.

Each maps a batch to integer codes (`encode`) and back (`decode`), has `num_codes` and
`tokens_per_item`, and returns its training losses from `forward`. Pixels are in [-1, 1],
masks in {0, 1}.

- `SeedImageTokenizer` (SEED): ViT patch encoder -> causal Q-Former (learned queries with
  causal self-attention, cross-attending to the patches) -> quantiser -> a decoder whose
  patch queries cross-attend to the 32 codes and predict pixels (optionally also the encoder
  features). Causal queries make the code sequence one-dimensional and left-to-right.
  `frontend: pca` (the recipe's) swaps the patch encoder and pixel decoder for a frozen
  PCA basis of the training crops with linear maps around it, which trains on CPU budgets.
- `HiMTokMaskTokenizer` (HiMTok): a conv + transformer mask encoder, 32 causal latent tokens
  -> quantiser -> a decoder that reconstructs the mask from any prefix of the tokens (the
  rest is masked out of its attention). Trained on random prefixes with a hierarchical loss
  over several resolutions, so early tokens carry the coarse shape and later ones detail.
  `architecture: dct` (the recipe's) swaps the conv / transformer parts for MLPs that read
  and write the mask through a fixed 2-D DCT basis: the one that trains on CPU budgets.
- `FrameVQ` (LWM's VQGAN, without the GAN): a convolutional autoencoder quantising every
  position of a 16 x 16 latent grid: 256 codes per frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmfm.core.errors import ConfigError, TokenizerError
from mmfm.tokenization.visual.layers import (
    PCABasis,
    causal_mask,
    decoder,
    encoder,
    patchify,
    unpatchify,
)
from mmfm.tokenization.visual.quantizer import VectorQuantizer, quantizer


@dataclass
class SeedImageConfig:
    image_size: int = 64
    patch: int = 8
    dim: int = 128
    heads: int = 4
    encoder_layers: int = 2
    qformer_layers: int = 2
    decoder_layers: int = 2
    tokens: int = 32
    codebook_size: int = 8192
    code_dim: int = 16
    beta: float = 0.25
    quantizer: str = "vq"
    """vq (a learned book of l2-normalised `code_dim`-d codes) or fsq (a fixed grid)."""
    fsq_levels: tuple[int, ...] = ()
    """fsq: values per dimension; their product is `codebook_size` (8192: 8, 8, 8, 4, 4)."""
    feature_loss: float = 0.0
    """Weight of reconstructing the encoder's patch features too (0: pixels only; patches
    only)."""
    frontend: str = "patches"
    """patches: a ViT patch encoder read out by the causal Q-Former's learned queries.
    pca: a frozen PCA basis fitted on the training crops before training (`fit`), whose
    whitened coefficients are read out linearly into the 32 queries, then causal self-attention
    among them; decoded linearly (plus a residual MLP) back to the coefficients. The only one
    of the two that beats its same-bits baseline on CPU budgets (bench/README.md)."""
    components: int = 256
    """pca: principal components kept (the reconstruction's ceiling: 23 dB at 256 on the
    held-out photos of tokenizers/seed_image.yaml)."""
    decoder_hidden: int = 512
    """pca: width of the decoder's residual MLP (0: a linear decoder)."""


class SeedImageTokenizer(nn.Module):
    kind = "seed_image"

    def __init__(self, cfg: SeedImageConfig):
        super().__init__()
        if cfg.frontend not in ("patches", "pca"):
            raise ConfigError(f"model.frontend {cfg.frontend!r} is not patches or pca")
        if cfg.frontend == "pca" and cfg.feature_loss:
            raise ConfigError("model.feature_loss needs frontend: patches (pca has no features)")
        self.cfg = cfg
        self.queries = nn.Parameter(0.02 * torch.randn(cfg.tokens, cfg.dim))
        self.quantizer = quantizer(
            cfg.quantizer, cfg.dim, cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.fsq_levels
        )
        if cfg.frontend == "pca":
            self._init_pca(cfg)
            return
        n_patches = (cfg.image_size // cfg.patch) ** 2
        self.patch_embed = nn.Linear(3 * cfg.patch**2, cfg.dim)
        self.patch_pos = nn.Parameter(0.02 * torch.randn(n_patches, cfg.dim))
        self.encoder = encoder(cfg.dim, cfg.encoder_layers, cfg.heads)
        self.qformer = decoder(cfg.dim, cfg.qformer_layers, cfg.heads)
        self.out_queries = nn.Parameter(0.02 * torch.randn(n_patches, cfg.dim))
        self.decoder = decoder(cfg.dim, cfg.decoder_layers, cfg.heads)
        self.to_pixels = nn.Linear(cfg.dim, 3 * cfg.patch**2)
        self.to_features = nn.Linear(cfg.dim, cfg.dim) if cfg.feature_loss else None

    def _init_pca(self, cfg: SeedImageConfig) -> None:
        k, width = cfg.components, cfg.tokens * cfg.dim
        self.basis = PCABasis(3 * cfg.image_size**2, k)
        self.readout = nn.Linear(k, width)
        self.qformer = encoder(cfg.dim, cfg.qformer_layers, cfg.heads)  # causal self-attention
        self.to_coefficients = nn.Linear(width, k)
        self.refine = None
        if cfg.decoder_hidden:  # starts at zero: training begins from the linear decoder
            self.refine = nn.Sequential(
                nn.Linear(width, cfg.decoder_hidden), nn.GELU(), nn.Linear(cfg.decoder_hidden, k)
            )
            nn.init.zeros_(self.refine[2].weight)
            nn.init.zeros_(self.refine[2].bias)
        self.to_features = None

    @property
    def needs_fit(self) -> bool:
        """Whether `fit` must see training crops before the first step (pca: its basis)."""
        return self.cfg.frontend == "pca"

    def fit(self, images: torch.Tensor) -> None:
        """pca: fit the frozen basis on training crops `[N, 3, S, S]` (N >= components)."""
        self.basis.fit(images)

    @property
    def num_codes(self) -> int:
        return self.cfg.codebook_size

    @property
    def tokens_per_item(self) -> int:
        return self.cfg.tokens

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """patches: the encoded patches; pca: the whitened principal coefficients."""
        if self.cfg.frontend == "pca":
            if not self.basis.fitted:
                raise TokenizerError(
                    "seed_image frontend pca: the basis was never fitted; train the tokenizer "
                    "with mmfm tokenizer train (it fits the basis on the training crops first)"
                )
            return self.basis.analyse(images)
        return self.encoder(self.patch_embed(patchify(images, self.cfg.patch)) + self.patch_pos)

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(self.cfg.tokens, features.device)
        if self.cfg.frontend == "pca":
            q = self.readout(features).view(len(features), self.cfg.tokens, -1) + self.queries
            return self.qformer(q, mask=mask, is_causal=True)
        q = self.queries.expand(features.shape[0], -1, -1)
        return self.qformer(q, features, tgt_mask=mask)

    def _decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """patches: the decoded patch features; pca: the whitened coefficients."""
        if self.cfg.frontend == "pca":
            flat = z.flatten(1)
            coefficients = self.to_coefficients(flat)
            return coefficients if self.refine is None else coefficients + self.refine(flat)
        return self.decoder(self.out_queries.expand(z.shape[0], -1, -1), z)

    def _pixels(self, h: torch.Tensor) -> torch.Tensor:
        if self.cfg.frontend == "pca":
            return self.basis.synthesise(h).view(len(h), 3, self.cfg.image_size, -1)
        patches = self.to_pixels(h)
        return unpatchify(patches, self.cfg.patch, 3, self.cfg.image_size)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self._features(images)
        z, codes, vq_loss = self.quantizer(self._tokens(features))
        h = self._decode_features(z)
        recon = self._pixels(h)
        losses = {"reconstruction": F.mse_loss(recon, images), "vq": vq_loss}
        if self.to_features is not None:
            target = features.detach()
            losses["features"] = self.cfg.feature_loss * F.mse_loss(self.to_features(h), target)
        return {"loss": sum(losses.values()), "codes": codes, "output": recon, **losses}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` in [-1, 1] -> codes `[B, tokens]`."""
        return self.quantizer(self._tokens(self._features(images)))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._pixels(self._decode_features(self.quantizer.lookup(codes))).clamp(-1, 1)


@dataclass
class HiMTokConfig:
    mask_size: int = 64
    stem: int = 4
    """Downsampling of the convolutional stem (64 / 4 = a 16 x 16 feature grid)."""
    dim: int = 128
    heads: int = 4
    encoder_layers: int = 2
    latent_layers: int = 2
    decoder_layers: int = 2
    tokens: int = 32
    codebook_size: int = 1024
    code_dim: int = 16
    beta: float = 0.25
    quantizer: str = "vq"
    """vq (a learned book of l2-normalised `code_dim`-d codes) or fsq (a fixed grid)."""
    fsq_levels: tuple[int, ...] = ()
    """fsq: values per dimension; their product is `codebook_size` (1024: 4, 4, 4, 4, 4)."""
    levels: tuple[int, ...] = (8, 16, 32, 64)
    """Resolutions of the hierarchical loss, coarse to fine."""
    level_weights: tuple[float, ...] = (2.0, 1.5, 1.0, 1.0)
    level_tokens: tuple[int, ...] = ()
    """Shortest prefix supervised at each level (one per level, rising): a prefix of k tokens
    is trained on the levels it reaches, so a short prefix is asked for the coarse shape only
    and detail is left to later tokens. Empty: every prefix at every level."""
    full_prefix: bool = False
    """Also decode every item from all its tokens each step (besides its random prefix), so
    the finest level is trained on every item, not on 1 in 2 of them."""
    query_pool: bool = True
    """Start each latent query from its own learned pooling of the feature grid. Learned
    queries alone, the same for every item, read only a near-uniform average of the grid in
    short trainings: one mean blob whatever the mask (bench/README.md). False: checkpoints
    trained before this field."""
    architecture: str = "transformer"
    """transformer: the conv stem, transformer encoder, causal latent queries and transformer
    decoder above. dct: masks are read and written through a fixed 2-D DCT basis (its
    `coefficients` lowest frequencies) with an MLP encoder and decoder. The transformer
    readout passes only "how much foreground" in CPU budgets and its codes collapse; a fixed,
    well-conditioned basis trains in minutes (bench/README.md). The default keeps older
    checkpoints loadable."""
    coefficients: int = 256
    """dct: DCT coefficients kept, low frequencies first (256 of 64 x 64 reconstruct the
    held-out masks at IoU 0.90)."""
    hidden: int = 1024
    """dct: width of the MLP encoder and decoder; `dim` is the width of one token."""


def dct_basis(size: int, count: int) -> torch.Tensor:
    """The `count` lowest-frequency 2-D DCT-II basis images of `size` x `size`, orthonormal,
    `[count, size * size]`: by u + v, then max(u, v), so coarse shapes come first."""
    k = torch.arange(size, dtype=torch.float64)
    d = torch.cos(torch.pi * (k[None] + 0.5) * k[:, None] / size) * (2 / size) ** 0.5
    d[0] /= 2**0.5
    u, v = (x.flatten().tolist() for x in torch.meshgrid(k, k, indexing="ij"))
    order = sorted(range(size * size), key=lambda i: (u[i] + v[i], max(u[i], v[i]), i))
    basis = torch.einsum("ux,vy->uvxy", d, d).reshape(size * size, size * size)
    return basis[order[:count]].float()


class HiMTokMaskTokenizer(nn.Module):
    kind = "himtok_mask"

    def __init__(self, cfg: HiMTokConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.architecture not in ("transformer", "dct"):
            raise ConfigError(f"model.architecture {cfg.architecture!r} is not transformer or dct")
        if cfg.architecture == "dct":
            self._build_dct()
        else:
            self._build_transformer()
        self.quantizer = quantizer(
            cfg.quantizer, cfg.dim, cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.fsq_levels
        )

    def _build_dct(self) -> None:
        """The fixed basis (a buffer, rebuilt, not saved) and the two MLPs around it."""
        cfg = self.cfg
        if not 1 <= cfg.coefficients <= cfg.mask_size**2:
            raise ConfigError(
                f"model.coefficients {cfg.coefficients} must be in 1..{cfg.mask_size**2} "
                f"(mask_size {cfg.mask_size} squared)"
            )
        self.register_buffer("basis", dct_basis(cfg.mask_size, cfg.coefficients), persistent=False)
        self.dct_encoder = nn.Sequential(
            nn.Linear(cfg.coefficients, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.tokens * cfg.dim),
        )
        self.dct_decoder = nn.Sequential(
            nn.Linear(cfg.tokens * cfg.dim, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.coefficients),
        )
        self.logit_scale = nn.Parameter(torch.tensor(8.0))  # DCT coefficients -> sharp logits

    def _build_transformer(self) -> None:
        cfg = self.cfg
        grid = cfg.mask_size // cfg.stem
        self.stem = nn.Sequential(
            nn.Conv2d(1, cfg.dim // 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(cfg.dim // 2, cfg.dim, 3, stride=cfg.stem // 2, padding=1),
        )
        self.grid_pos = nn.Parameter(0.02 * torch.randn(grid * grid, cfg.dim))
        self.encoder = encoder(cfg.dim, cfg.encoder_layers, cfg.heads)
        self.latents = nn.Parameter(0.02 * torch.randn(cfg.tokens, cfg.dim))
        pool = torch.randn(cfg.tokens, grid * grid) / grid if cfg.query_pool else None
        self.query_pool = None if pool is None else nn.Parameter(pool)
        self.latent_former = decoder(cfg.dim, cfg.latent_layers, cfg.heads)
        self.out_queries = nn.Parameter(0.02 * torch.randn(grid * grid, cfg.dim))
        self.decoder = decoder(cfg.dim, cfg.decoder_layers, cfg.heads)
        self.to_logits = nn.Linear(cfg.dim, cfg.stem * cfg.stem)

    @property
    def num_codes(self) -> int:
        return self.cfg.codebook_size

    @property
    def tokens_per_item(self) -> int:
        return self.cfg.tokens

    def _tokens(self, masks: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "dct":  # scaled so that the coefficients are O(1)
            coefficients = (masks.float().flatten(1) * 2 - 1) @ self.basis.t() / 8
            return self.dct_encoder(coefficients).view(len(masks), self.cfg.tokens, -1)
        f = self.stem(masks[:, None].float() * 2 - 1).flatten(2).transpose(1, 2)
        f = self.encoder(f + self.grid_pos)
        q = self.latents.expand(masks.shape[0], -1, -1)
        if self.query_pool is not None:  # a different query per item: breaks the symmetry
            q = q + torch.einsum("tp,bpd->btd", self.query_pool, f)
        return self.latent_former(q, f, tgt_mask=causal_mask(self.cfg.tokens, masks.device))

    def _logits(self, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mask logits from tokens `z`, using only the first keep[b] tokens of item b."""
        hidden = torch.arange(z.shape[1], device=z.device)[None] >= keep[:, None]
        if self.cfg.architecture == "dct":  # the hidden tokens are zeroed
            coefficients = self.dct_decoder((z * ~hidden[..., None]).flatten(1))
            size = self.cfg.mask_size
            return (coefficients @ self.basis).view(-1, size, size) * self.logit_scale
        h = self.decoder(
            self.out_queries.expand(z.shape[0], -1, -1), z, memory_key_padding_mask=hidden
        )
        return unpatchify(self.to_logits(h), self.cfg.stem, 1, self.cfg.mask_size)[:, 0]

    def forward(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Nested dropout: each item is decoded from a random prefix (and, with `full_prefix`,
        from all its tokens), each prefix supervised at the levels it reaches."""
        z, codes, vq_loss = self.quantizer(self._tokens(masks))
        n, tokens = len(masks), self.cfg.tokens
        keep = torch.randint(1, tokens + 1, (n,), device=masks.device)
        target = masks.float()[:, None]
        if self.cfg.full_prefix:
            z, target = torch.cat([z, z]), torch.cat([target, target])
            keep = torch.cat([keep, torch.full_like(keep, tokens)])
        logits = self._logits(z, keep)
        loss = self._hierarchical_loss(logits, target, keep)
        return {"loss": loss + vq_loss, "codes": codes, "output": logits[:n], "vq": vq_loss}

    def _hierarchical_loss(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """BCE of the pooled prediction at each level, over the items whose prefix reaches it."""
        prob = torch.sigmoid(logits)[:, None]
        reach = self.cfg.level_tokens or (1,) * len(self.cfg.levels)
        loss = 0.0
        levels = zip(self.cfg.levels, self.cfg.level_weights, reach, strict=True)
        for size, weight, shortest in levels:
            t = F.adaptive_avg_pool2d(target, size)
            p = F.adaptive_avg_pool2d(prob, size).clamp(1e-6, 1 - 1e-6)
            per_item = F.binary_cross_entropy(p, t, reduction="none").flatten(1).mean(1)
            loss = loss + weight * (per_item * (keep >= shortest)).sum() / len(keep)
        return loss

    @torch.no_grad()
    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """`[B, S, S]` in {0, 1} -> codes `[B, tokens]`, coarse to fine."""
        return self.quantizer(self._tokens(masks))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Masks from codes `[B, k]`, any prefix length 1 <= k <= tokens."""
        k = codes.shape[1]
        z = self.quantizer.lookup(codes)
        pad = torch.zeros(len(codes), self.cfg.tokens - k, z.shape[-1], device=z.device)
        keep = torch.full((len(codes),), k, device=codes.device)
        return (self._logits(torch.cat([z, pad], 1), keep) > 0).to(torch.uint8)


@dataclass
class FrameVQConfig:
    frame_size: int = 64
    hidden: int = 64
    dim: int = 64
    codebook_size: int = 8192
    code_dim: int = 16
    beta: float = 0.25


class FrameVQ(nn.Module):
    """A convolutional VQ autoencoder: 16 x 16 = 256 codes per 64 x 64 frame."""

    kind = "video"

    def __init__(self, cfg: FrameVQConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden, cfg.dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, h, 4, 2, 1), nn.GELU(), nn.Conv2d(h, h, 4, 2, 1), nn.GELU(),
            nn.Conv2d(h, d, 3, 1, 1),
        )  # fmt: skip
        self.quantizer = VectorQuantizer(d, cfg.codebook_size, cfg.code_dim, cfg.beta)
        self.decoder = nn.Sequential(
            nn.Conv2d(d, h, 3, 1, 1), nn.GELU(), nn.ConvTranspose2d(h, h, 4, 2, 1), nn.GELU(),
            nn.ConvTranspose2d(h, 3, 4, 2, 1),
        )  # fmt: skip

    @property
    def num_codes(self) -> int:
        return self.cfg.codebook_size

    @property
    def tokens_per_item(self) -> int:
        return (self.cfg.frame_size // 4) ** 2

    def _grid(self, z: torch.Tensor) -> torch.Tensor:
        g = self.cfg.frame_size // 4
        return z.transpose(1, 2).reshape(len(z), -1, g, g)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(frames).flatten(2).transpose(1, 2)
        q, codes, vq_loss = self.quantizer(z)
        recon = self.decoder(self._grid(q))
        loss = F.mse_loss(recon, frames)
        return {"loss": loss + vq_loss, "codes": codes, "output": recon, "vq": vq_loss}

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """`[N, 3, S, S]` in [-1, 1] -> codes `[N, 256]` (row-major over the latent grid)."""
        return self.quantizer(self.encoder(frames).flatten(2).transpose(1, 2))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._grid(self.quantizer.lookup(codes))).clamp(-1, 1)


MODELS = {
    "seed_image": (SeedImageTokenizer, SeedImageConfig),
    "himtok_mask": (HiMTokMaskTokenizer, HiMTokConfig),
    "video": (FrameVQ, FrameVQConfig),
}


def config_dict(model: nn.Module) -> dict:
    return {"kind": model.kind, **asdict(model.cfg)}
