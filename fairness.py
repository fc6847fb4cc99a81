"""
FairLLaVA's fairness regulariser: the DAC, the DIM penalty and the alternating step.

Follows "FairLLaVA: Fairness-Aware Parameter-Efficient Fine-Tuning for Large Vision-Language
Assistants" (CVPR 2026, arXiv 2603.26008), Sec. 3 / Algorithm 1:

    h = h(x)                          pooled hidden state of one LLM layer (Sec. "Hidden layer selection")
    L_DAC = -E[log phi(a | sg(h))]    Demographic Attribute Classifier; trains phi only
    L_DIM = CLUB(h; a) with phi frozen  Demographic Information Minimisation; trains LoRA + projector
    L_total = lambda1 L_DAC + sum_a lambda_a L_DIM^a + lambda3 L_LM   (joint multi-attribute debiasing)

The DIM term is the categorical CLUB upper bound on the mutual information I(h; a) (Cheng et al.,
"CLUB: A Contrastive Log-ratio Upper Bound of Mutual Information", ICML 2020), with the DAC as the
variational posterior q(a | h). Minimising it removes what a linear read-out of h can tell about
the patient's race, age or gender.

This file needs torch, and data.py / model.py for two constants (attribute codes, IGNORE_INDEX).
It works on the list of hidden states and the token masks the model returns (LlavaOutput.hidden / .image_mask / .attention_mask / .labels). Use from train.py:

    fair = FairnessRegularizer(FairnessConfig(), hidden_size=4096).to(device)
    dac_opt = torch.optim.AdamW(fair.parameters(), lr=1e-4, weight_decay=0.0)
    out = llava(..., return_hidden=True)
    h, valid = fair.pool(out.hidden, image_mask=out.image_mask,
                         attention_mask=out.attention_mask, labels=out.labels)
    dim, stats = fair(h, batch["attrs"], dac_opt, valid=valid)  # phi is stepped inside
    (out.loss + dim).backward()                                 # reaches LoRA + projector only

What is followed, and the official code's variants (offered as options):
- phi is one Linear(hidden, K_a) per attribute (official).
- h: the paper ablates first / mid / last / mean(first, mid, last); mid is the default (the
  paper's best, and the official `hidden_states[int(0.5 * 33)]`). Tokens: image tokens (official),
  answer tokens or every non-pad token, masked mean; or the official "one random token per sample,
  L2-normalised" variant.
- What phi and DIM see of h (`h_norm`): h itself (paper), h / ||h|| (official code) or h standardised
  over the batch (not in either; see normalize_h).
- Negative pairs: official = off-diagonal pairs of the batch; original CLUB = all pairs.
- Penalty: official = smooth |CLUB| = sqrt(CLUB^2 + 1e-6); original CLUB = CLUB itself.
- Protocol: the paper's alternating step (phi updated first, then frozen for L_DIM), or the official
  single optimizer step with both terms kept apart by stop-gradients.
A caveat the tests and the demo's curves make visible: DIM removes only what the current phi can
read. If phi lags the backbone, the backbone can fool that phi instead of dropping the attribute
(the usual failure of adversarial games): with raw h it shrinks and turns h against phi's current
weights, phi sits at chance, CLUB ~ 0, and a fresh probe still reads the attribute. Options that
keep phi closer to its best response (not in the paper): a scale-blind view of h (`h_norm`), more
phi steps per batch (`dac_steps`), a larger phi learning rate, and a memory of earlier batches'
h for phi to fit (`dac_memory`). `leak_report` measures all of it on held-out data.
Left out: any non-linear leak a linear phi cannot see stays in h; with DDP each rank keeps its own
phi unless the caller wraps it.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from data import ATTRIBUTES, UNKNOWN
from model import IGNORE_INDEX


LAYER_NAMES = ("first", "mid", "last", "mean")
TOKEN_CHOICES = ("image", "answer", "all")
POOL_CHOICES = ("mean", "random_token")
NEGATIVE_CHOICES = ("off_diagonal", "all")
PROTOCOLS = ("alternating", "single_step")
H_NORMS = ("none", "l2", "batch")
DAC_INITS = ("torch", "normal")


def _official_head_sizes():
    return {a: spec.num_classes for a, spec in ATTRIBUTES.items()}


@dataclass
class FairnessConfig:
    """The regulariser's settings, official MIMIC-CXR values as defaults. `help` is what train.py's
    flag of the same name prints."""
    attributes: tuple = field(default=("race", "age", "gender"), metadata=dict(
        help="attributes debiased jointly (one name: the single-attribute ablation)"))
    # head sizes: data.ATTRIBUTES, 9 + 3 + 2 = 14 classes -> 14 * 4096 + 14 = 57,358 parameters ("~57K")
    num_classes: dict = field(default_factory=_official_head_sizes, metadata=dict(help=None))
    lambdas: dict = field(default_factory=lambda: {"race": 0.2, "age": 0.6, "gender": 0.1}, metadata=dict(
        help="per-attribute DIM weights lambda_a (lambda2), e.g. race=0.2 age=0.6 gender=0.1"))
    dac_weight: float = field(default=1.0, metadata=dict(help="lambda1, the weight of L_DAC"))
    layer: str = field(default="mid", metadata=dict(help="hidden layer h is read from: first | mid | last | mean | an index"))
    tokens: str = field(default="image", metadata=dict(help="positions pooled into h: image | answer | all"))
    pool: str = field(default="mean", metadata=dict(
        help="mean (masked mean) | random_token (official: one random token, L2-normalised)"))
    h_norm: str = field(default="none", metadata=dict(
        help="how phi and DIM see h: none (paper) | l2 (per sample, as the official code) | batch "
             "(each feature standardised over the batch); l2 and batch are blind to the scale of h"))
    protocol: str = field(default="alternating", metadata=dict(
        help="alternating (paper, Algorithm 1) | single_step (official code: one optimizer step)"))
    dac_steps: int = field(default=1, metadata=dict(help="phi updates per batch in the alternating protocol (paper: 1)"))
    dac_memory: int = field(default=0, metadata=dict(
        help="phi also fits the last N pooled h of earlier batches (as phi and DIM see them), so that it "
             "tracks the representation instead of the 16 samples in front of it (paper: 0)"))
    negatives: str = field(default="off_diagonal", metadata=dict(
        help="CLUB's negative pairs: off_diagonal (official) | all (original CLUB)"))
    smooth_abs: bool = field(default=True, metadata=dict(help="penalty sqrt(CLUB^2 + eps) (official) instead of CLUB"))
    smooth_eps: float = field(default=1e-6, metadata=dict(help=None))
    dac_init: str = field(default="torch", metadata=dict(
        help="phi's initial weights: torch (nn.Linear's default) | normal (the official code: HF's normal, "
             "std 0.02, zero bias)"))

    def __post_init__(self):
        self.attributes = tuple(self.attributes)
        if not self.attributes:
            raise ValueError("FairnessConfig.attributes is empty")
        if isinstance(self.layer, str) and self.layer.lstrip("-").isdigit():
            self.layer = int(self.layer)  # "16" from the command line is a layer index
        if self.dac_memory < 0:
            raise ValueError(f"FairnessConfig.dac_memory must be >= 0, got {self.dac_memory}")
        if self.dac_steps < 1:
            raise ValueError(f"FairnessConfig.dac_steps must be >= 1, got {self.dac_steps}")
        for a in self.attributes:
            if a not in self.num_classes:
                raise ValueError(f"FairnessConfig.num_classes has no entry for attribute {a!r}")
            if a not in self.lambdas:
                raise ValueError(f"FairnessConfig.lambdas has no entry for attribute {a!r}")
            if self.num_classes[a] < 1:
                raise ValueError(f"FairnessConfig.num_classes[{a!r}] must be >= 1, got {self.num_classes[a]}")
            if not (isinstance(self.lambdas[a], (int, float)) and 0 <= self.lambdas[a] < math.inf):
                raise ValueError(f"FairnessConfig.lambdas[{a!r}] must be a finite number >= 0, got {self.lambdas[a]}")
        for name in ("dac_weight", "smooth_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf) or (name == "smooth_eps" and value == 0):
                raise ValueError(f"FairnessConfig.{name} must be a finite number {'> 0' if name == 'smooth_eps' else '>= 0'}, "
                                 f"got {value}")
        unknown = set(self.lambdas) - set(self.num_classes)
        if unknown:
            raise ValueError(f"FairnessConfig.lambdas names unknown attributes {sorted(unknown)}; "
                             f"known: {sorted(self.num_classes)}")
        if not (isinstance(self.layer, int) or self.layer in LAYER_NAMES):
            raise ValueError(f"FairnessConfig.layer must be one of {LAYER_NAMES} or an int, got {self.layer!r}")
        for name, value, choices in [("tokens", self.tokens, TOKEN_CHOICES), ("pool", self.pool, POOL_CHOICES),
                                     ("negatives", self.negatives, NEGATIVE_CHOICES),
                                     ("protocol", self.protocol, PROTOCOLS), ("h_norm", self.h_norm, H_NORMS),
                                     ("dac_init", self.dac_init, DAC_INITS)]:
            if value not in choices:
                raise ValueError(f"FairnessConfig.{name} must be one of {choices}, got {value!r}")

    def check_layer(self, num_hidden_layers):
        """An integer --layer must name one of the model's n_layers + 1 hidden states (see
        select_layers); found out before a model is loaded, not at the first step."""
        n = num_hidden_layers + 1
        if isinstance(self.layer, int) and not -n <= self.layer < n:
            raise ValueError(f"--layer {self.layer}: the model has {num_hidden_layers} layers, so hidden states "
                             f"0..{n - 1} (or -{n}..-1 from the end)")

    @classmethod
    def single(cls, attribute, **overrides):
        """Single-attribute debiasing (the paper's "seesaw" ablation): only `attribute` is regularised."""
        return cls(attributes=(attribute,), **overrides)


# -----------------------------------------------------------------------------
# h(x): which layer, which tokens, how pooled

def select_layers(hidden, layer):
    """
    Pick the hidden state(s) h is read from. `hidden` follows the HF order: hidden[0] is the
    embedding output and hidden[i] the output of decoder layer i (n_layers + 1 entries; HF's last
    entry has the final RMSNorm applied).
      first = hidden[1]                      output of the first decoder layer
      mid   = hidden[int(0.5 * len(hidden))]  official; layer 16 of 32 for Vicuna-7B
      last  = hidden[-1]
      mean  = [first, mid, last]             their pooled vectors are averaged
      int i = hidden[i]                      any layer (negative indices count from the end)
    """
    n = len(hidden)
    if n < 2:
        raise ValueError(f"need the embedding output and at least one layer output, got {n} hidden states")
    first, mid, last = 1, int(0.5 * n), n - 1
    if isinstance(layer, int):
        if not -n <= layer < n:
            raise IndexError(f"FairnessConfig.layer={layer} is out of range for {n} hidden states")
        return [hidden[layer]]
    return {"first": [hidden[first]], "mid": [hidden[mid]], "last": [hidden[last]],
            "mean": [hidden[first], hidden[mid], hidden[last]]}[layer]


def token_mask(tokens, image_mask=None, attention_mask=None, labels=None):
    """
    (B, T) bool mask of the positions pooled into h.
      image  = image_mask                 the projected patch embeddings (official)
      answer = labels != IGNORE_INDEX     the report / answer tokens
      all    = attention_mask             every non-pad token
    Padding is always excluded when attention_mask is given.
    """
    if tokens == "image":
        if image_mask is None:
            raise ValueError("tokens='image' needs image_mask")
        mask = image_mask.bool()
    elif tokens == "answer":
        if labels is None:
            raise ValueError("tokens='answer' needs labels")
        mask = labels != IGNORE_INDEX
    elif tokens == "all":
        if attention_mask is None:
            raise ValueError("tokens='all' needs attention_mask")
        mask = attention_mask.bool()
    else:
        raise ValueError(f"tokens must be one of {TOKEN_CHOICES}, got {tokens!r}")
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


def pool_hidden(hidden, mask, layer="mid", pool="mean", generator=None):
    """
    h(x) = mean over the chosen layers l of  pool_t { hidden_l[b, t] : mask[b, t] }.
      mean:          sum_t m_bt x_bt / sum_t m_bt               (masked mean)
      random_token:  x_{b, t_b} / ||x_{b, t_b}||_2, t_b ~ U{t : m_bt}  (official variant; the same
                     token is used for every chosen layer, normalised after the layer average)
    Returns (h (B, H) float32, nonempty (B,) bool). A sample with no token in its mask gets
    h = 0 and nonempty = False; the regulariser leaves such samples out of both losses.
    """
    layers = select_layers(hidden, layer)
    B, T, H = layers[0].shape
    if mask.shape != (B, T):
        raise ValueError(f"token mask has shape {tuple(mask.shape)}, hidden states have (B, T) = {(B, T)}")
    mask = mask.bool()
    nonempty = mask.any(dim=1)  # (B,)
    if pool == "mean":
        m = mask.unsqueeze(-1).float()  # (B, T, 1)
        count = m.sum(dim=1).clamp_min(1.0)  # (B, 1); empty rows give 0 / 1 = 0
        # fp32 sums: bf16 loses precision over hundreds of image tokens
        per_layer = [(x.float() * m).sum(dim=1) / count for x in layers]  # each (B, H)
        return torch.stack(per_layer).mean(dim=0), nonempty
    if pool == "random_token":
        # uniform choice among masked positions: argmax of uniform noise, pushed to -1 off the mask
        gen_device = generator.device if generator is not None else mask.device
        noise = torch.rand(B, T, generator=generator, device=gen_device).to(mask.device)
        idx = noise.masked_fill(~mask, -1.0).argmax(dim=1)  # (B,)
        rows = torch.arange(B, device=mask.device)
        h = torch.stack([x[rows, idx].float() for x in layers]).mean(dim=0)  # (B, H)
        h = F.normalize(h, dim=-1) * nonempty.unsqueeze(-1)  # empty rows -> 0
        return h, nonempty
    raise ValueError(f"pool must be one of {POOL_CHOICES}, got {pool!r}")


# -----------------------------------------------------------------------------
# phi: the Demographic Attribute Classifier

class DAC(nn.Module):
    """phi: one linear head per attribute mapping h to class logits, q(a | h) = softmax(phi_a(h))."""

    def __init__(self, hidden_size, num_classes):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(hidden_size, k) for a, k in num_classes.items()})

    def forward(self, h):
        return {a: head(h) for a, head in self.heads.items()}  # each (B, K_a)


def normalize_h(h, mode, valid=None, eps=1e-5):
    """
    The view of h that phi and DIM share (FairnessConfig.h_norm):
      none   h                                         the paper
      l2     h_i / ||h_i||_2                           per sample, as the official code
      batch  (h - mu) / sqrt(var + eps * mean(var))    each feature over the batch's valid rows
    With "none", the backbone can lower L_DIM by shrinking or turning h against the current phi
    instead of removing the attribute; l2 and batch give it nothing to gain that way: for any
    c > 0, normalize_h(c h) = normalize_h(h) (batch: exactly, eps being relative). "batch" also
    puts every feature on one scale, so a phi taking one step per batch can read an attribute that
    lives in small directions of a residual stream dominated by a few large ones. mu and var are
    constants to the gradient (see below), so the values are scale-blind and the gradient
    does not push h's scale up.
    """
    if mode == "none":
        return h
    if mode == "l2":
        return F.normalize(h, dim=-1)
    if mode != "batch":
        raise ValueError(f"h_norm must be one of {H_NORMS}, got {mode!r}")
    rows = h if valid is None else h[valid]
    if rows.shape[0] < 2:  # no statistics: nothing to contrast either, so CLUB is 0 anyway
        return h - h.detach()
    # statistics as constants (stop-gradient): with their gradient the loss is exactly scale-free,
    # its gradient is orthogonal to h, and every Adam step inflates h (measured: rms 1 -> 150 in
    # 375 steps, the LM's residual stream swamped); without it h keeps its scale (rms ~1)
    rows = rows.detach()
    mu, var = rows.mean(0), rows.var(0, unbiased=False)  # (H,) each
    return (h - mu) * torch.rsqrt(var + eps * var.mean().clamp_min(1e-30))


# -----------------------------------------------------------------------------
# the losses, as pure functions of logits and labels (label -1 = left out)

def dac_loss(logits, labels):
    """
    L_DAC^a = -(1/|V|) sum_{i in V} log q(a_i | h_i),  V = {i : a_i != -1}
    The caller passes logits computed from sg(h), so this trains phi only.
    No known label: 0 (with a zero gradient, so the graph stays intact).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"dac_loss: logits (B, K) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    valid = labels >= 0
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), labels[valid])


def club(logits, labels, negatives="off_diagonal"):
    """
    Categorical CLUB estimate of I(h; a) with the variational posterior q(a | h) = softmax(logits):
        log_mat[i, j] = log q(a_j | h_i)                        (N, N), over the N known samples
        positive = (1/N) sum_i log_mat[i, i]                    pairs (h_i, a_i) ~ p(h, a)
        negative = 1/(N(N-1)) sum_{i != j} log_mat[i, j]         official: pairs ~ p(h) p(a)
                 = (1/N^2)    sum_{i, j}  log_mat[i, j]         negatives="all": original CLUB
        CLUB = positive - negative
    With q the true posterior, E[CLUB] >= I(h; a) (Cheng et al. 2020, Thm. 3.1); if h and a are
    independent, E[CLUB] = 0 for any q.
    Defined values: fewer than 2 known samples, a batch from a single group, or a one-class
    attribute all give 0 (row i of log_mat is then constant, so positive == negative).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"club: logits (B, K) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if negatives not in NEGATIVE_CHOICES:
        raise ValueError(f"negatives must be one of {NEGATIVE_CHOICES}, got {negatives!r}")
    valid = labels >= 0
    n = int(valid.sum())
    if n < 2:
        return logits.sum() * 0.0
    log_q = F.log_softmax(logits[valid].float(), dim=-1)  # (N, K)
    y = labels[valid]
    positive = log_q.gather(1, y.unsqueeze(1)).mean()  # diagonal of log_mat
    # sum_{i,j} log_mat[i, j] = sum_i sum_k count_k log q(k | h_i): no N x N matrix needed
    counts = torch.bincount(y, minlength=log_q.shape[1]).to(log_q.dtype)  # (K,)
    all_pairs = (log_q @ counts).sum()
    if negatives == "off_diagonal":
        negative = (all_pairs - positive * n) / (n * (n - 1))
    else:
        negative = all_pairs / (n * n)
    return positive - negative


def dim_penalty(club_value, smooth_abs=True, eps=1e-6):
    """
    Per-attribute DIM penalty: sqrt(CLUB^2 + eps), a smooth |CLUB| (official), so a CLUB pushed
    below zero by an imperfect q is pulled back rather than rewarded; or CLUB itself (original).
    Its gradient at CLUB = 0 is 0, so edge cases where CLUB is defined as 0 add lambda_a * sqrt(eps)
    to the value and nothing to the gradient.
    """
    return torch.sqrt(club_value * club_value + eps) if smooth_abs else club_value


# -----------------------------------------------------------------------------
# the regulariser: phi plus the paper's step

class FairnessRegularizer(nn.Module):
    """
    Holds phi and runs the paper's step. Its parameters are phi's only: give them to their own
    optimizer for the alternating protocol, or to the main optimizer for the single-step one.
    All methods return (loss, stats); stats are detached 0-d tensors for logging
    ("dac_loss/<a>", "dac_acc/<a>", "n/<a>" = known labels in the batch, "club/<a>",
    "dac_loss", "dim_loss"). dac_acc is 0 when n is 0.
    """

    def __init__(self, cfg, hidden_size):
        super().__init__()
        self.cfg = cfg
        self.dac = DAC(hidden_size, {a: cfg.num_classes[a] for a in cfg.attributes})
        if cfg.dac_init == "normal":  # as HF initialises the official code's phi
            for head in self.dac.heads.values():
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
        if cfg.dac_memory:  # FIFO of earlier batches' normalised sg(h) and labels; buffers, so checkpointed
            self.register_buffer("memory_h", torch.zeros(cfg.dac_memory, hidden_size))
            self.register_buffer("memory_y", torch.full((cfg.dac_memory, len(cfg.attributes)), UNKNOWN))
            self.register_buffer("memory_next", torch.zeros((), dtype=torch.long))

    def pool(self, hidden, image_mask=None, attention_mask=None, labels=None, generator=None):
        """h(x) as configured: returns (h (B, H) float32, nonempty (B,) bool)."""
        mask = token_mask(self.cfg.tokens, image_mask, attention_mask, labels)
        return pool_hidden(hidden, mask, self.cfg.layer, self.cfg.pool, generator)

    def labels(self, attrs, batch_size, device, valid=None):
        """attrs {name: (B,) long, -1 unknown} -> the labels the losses see (-1 = left out)."""
        out = {}
        for a in self.cfg.attributes:
            if a not in attrs:
                raise KeyError(f"attrs has no key {a!r} (FairnessConfig.attributes = {self.cfg.attributes})")
            y = attrs[a].to(device=device, dtype=torch.long)
            if y.shape != (batch_size,):
                raise ValueError(f"attrs[{a!r}] has shape {tuple(y.shape)}, expected ({batch_size},)")
            k = self.cfg.num_classes[a]
            if (y >= k).any() or (y < UNKNOWN).any():
                raise ValueError(f"attrs[{a!r}] has labels outside [-1, {k - 1}]: {y.tolist()}")
            if valid is not None:
                y = torch.where(valid.to(device), y, torch.full_like(y, UNKNOWN))
            out[a] = y
        return out

    def dac_loss(self, h, attrs, valid=None):
        """L_DAC = sum_a L_DAC^a on sg(h) and the memory, if any: gradients reach phi only.
        dac_loss/<a> is that loss; dac_acc/<a> and n/<a> describe the current batch alone."""
        ys = self.labels(attrs, h.shape[0], h.device, valid)
        z = normalize_h(h.detach(), self.cfg.h_norm, valid)
        if self.cfg.dac_memory:
            all_logits = self.dac(torch.cat([z, self.memory_h]))
            logits = {a: v[:len(z)] for a, v in all_logits.items()}
        else:
            all_logits = logits = self.dac(z)
        total, stats = 0.0, {}
        for i, a in enumerate(self.cfg.attributes):
            y_all = torch.cat([ys[a], self.memory_y[:, i]]) if self.cfg.dac_memory else ys[a]
            la = dac_loss(all_logits[a], y_all)
            known = ys[a] >= 0
            n = known.sum()
            correct = ((logits[a].argmax(-1) == ys[a]) & known).sum()
            stats[f"dac_loss/{a}"] = la.detach()
            stats[f"dac_acc/{a}"] = (correct.float() / n.clamp_min(1)).detach()
            stats[f"n/{a}"] = n.detach()
            total = total + la
        stats["dac_loss"] = total.detach()
        return total, stats

    def frozen_logits(self, h):
        """phi(h) with phi's parameters detached: gradients reach h (the backbone) only."""
        params = {name: p.detach() for name, p in self.dac.named_parameters()}
        return functional_call(self.dac, params, (h,))

    def dim_terms(self, h, attrs, valid=None):
        """L_DIM^a = penalty(CLUB_a(h)) per attribute, phi frozen -> ({a: L_DIM^a}, {"club/<a>"}):
        gradients reach h only. train.py weights them by lambda_a where it writes L_total."""
        ys = self.labels(attrs, h.shape[0], h.device, valid)
        logits = self.frozen_logits(normalize_h(h, self.cfg.h_norm, valid))
        terms, stats = {}, {}
        for a in self.cfg.attributes:
            c = club(logits[a], ys[a], self.cfg.negatives)
            stats[f"club/{a}"] = c.detach()
            terms[a] = dim_penalty(c, self.cfg.smooth_abs, self.cfg.smooth_eps)
        return terms, stats

    def dim_loss(self, h, attrs, valid=None):
        """L_DIM = sum_a lambda_a * penalty(CLUB_a(h)) with phi frozen: gradients reach h only."""
        terms, stats = self.dim_terms(h, attrs, valid)
        total = 0.0
        for a, term in terms.items():
            total = total + self.cfg.lambdas[a] * term
        stats["dim_loss"] = total.detach()
        return total, stats

    def alternating_step(self, h, attrs, dac_optimizer, valid=None):
        """
        Algorithm 1 from ONE backbone forward pass:
          (1) phi <- phi - step(grad_phi lambda1 L_DAC(sg(h)))   done here with dac_optimizer,
              cfg.dac_steps times on the same sg(h)
          (2) return L_DIM(h; phi frozen) built with the updated phi, for the caller to add to
              L_LM and backpropagate into LoRA + projector.
        The step goes through a closure, so any torch optimizer works, LBFGS included (which fits
        phi on the batch). The DAC stats are those of the first evaluation, i.e. of phi before
        it saw this batch. Under gradient accumulation phi is stepped once per micro-batch.
        """
        stats = self._fit_phi(h, attrs, dac_optimizer, valid)
        self.remember(h, attrs, valid)
        l_dim, dim_stats = self.dim_loss(h, attrs, valid)
        return l_dim, {**stats, **dim_stats}

    def _fit_phi(self, h, attrs, dac_optimizer, valid=None):
        """cfg.dac_steps steps of dac_optimizer on lambda1 L_DAC(sg(h)) -> the stats of the first."""
        seen = []

        def closure():
            dac_optimizer.zero_grad(set_to_none=True)
            l_dac, step_stats = self.dac_loss(h, attrs, valid)
            loss = self.cfg.dac_weight * l_dac
            loss.backward()
            seen.append(step_stats)
            return loss

        for _ in range(self.cfg.dac_steps):
            dac_optimizer.step(closure)
        return seen[0]

    def phi_step(self, h, attrs, dac_optimizer=None, valid=None):
        """Algorithm 1's step (1) as cfg.protocol says -> (the L_DAC still to be minimised, stats).
        alternating (paper): phi takes its own optimizer step(s) on lambda1 L_DAC(sg(h)) now (as in
        alternating_step) and nothing is left (0.0); single_step (official code): L_DAC(sg(h)),
        which the caller adds to L_total. Either way this batch's sg(h) then joins phi's memory."""
        if self.cfg.protocol == "alternating":
            if dac_optimizer is None:
                raise ValueError("protocol='alternating' needs a dac_optimizer over FairnessRegularizer.parameters()")
            l_dac, stats = 0.0, self._fit_phi(h, attrs, dac_optimizer, valid)
        else:
            l_dac, stats = self.dac_loss(h, attrs, valid)
        self.remember(h, attrs, valid)
        return l_dac, stats

    @torch.no_grad()
    def remember(self, h, attrs, valid=None):
        """Push this batch's normalised sg(h) and labels into phi's memory (oldest out first)."""
        if not self.cfg.dac_memory:
            return
        ys = self.labels(attrs, h.shape[0], h.device, valid)
        z = normalize_h(h.detach(), self.cfg.h_norm, valid)
        y = torch.stack([ys[a] for a in self.cfg.attributes], dim=1)  # (B, n_attributes)
        n, m = len(z), self.cfg.dac_memory
        skip = max(n - m, 0)  # a batch larger than the memory: as if pushed row by row, its last m rows stay
        idx = (self.memory_next + skip + torch.arange(n - skip, device=z.device)) % m
        self.memory_h[idx], self.memory_y[idx] = z[skip:].float(), y[skip:]
        self.memory_next.copy_((self.memory_next + n) % m)

    def single_step_loss(self, h, attrs, valid=None):
        """
        Official single-step variant: lambda1 L_DAC(sg(h)) + L_DIM(h; sg(phi)). One backward and one
        optimizer step over LoRA + projector + phi; the stop-gradients keep L_DAC on phi and L_DIM
        on the backbone. (phi is read before its update here, after it in the alternating step.)
        """
        l_dac, stats = self.dac_loss(h, attrs, valid)
        l_dim, dim_stats = self.dim_loss(h, attrs, valid)
        self.remember(h, attrs, valid)
        return self.cfg.dac_weight * l_dac + l_dim, {**stats, **dim_stats}

    def forward(self, h, attrs, dac_optimizer=None, valid=None):
        """The configured protocol: alternating_step (needs dac_optimizer) or single_step_loss."""
        if self.cfg.protocol == "alternating":
            if dac_optimizer is None:
                raise ValueError("protocol='alternating' needs a dac_optimizer over FairnessRegularizer.parameters()")
            return self.alternating_step(h, attrs, dac_optimizer, valid)
        return self.single_step_loss(h, attrs, valid)


# -----------------------------------------------------------------------------
# measuring the leak: what the mechanism does, on held-out data

def fit_linear_probe(x, y, num_classes, l2=1e-3, steps=300):
    """Multinomial logistic regression, full-batch L-BFGS on standardised features with a small L2
    penalty. The problem is convex and starts from zero, so the result is deterministic.
    Returns predict(x) -> class index."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # a probe should not depend on feature scale
    z = (x - mean) / std
    W = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda x_new: (((x_new - mean) / std) @ W + b).argmax(-1)


@torch.no_grad()
def leak_report(h, attrs, fair=None):
    """
    How much of each attribute held-out h (N, H) gives away, and what the regulariser sees of it:
      probe/<a>    accuracy of a fresh linear probe fitted on the even rows, tested on the odd ones
      dac_acc/<a>  accuracy of the current phi (through the configured h_norm, statistics of the set)
      club/<a>     CLUB with the current phi on the whole set
      h_rms        the spread of h: sqrt(mean over features of their variance)
    attrs {name: (N,) long, -1 unknown}; phi's entries only for the attributes `fair` debiases.
    A probe well above chance while phi sits at chance means the backbone is fooling phi.
    """
    h = h.float()
    out = {"h_rms": float(h.var(0, unbiased=False).mean().sqrt())}
    even, odd = torch.arange(0, len(h), 2), torch.arange(1, len(h), 2)
    for a, y in attrs.items():
        known_tr, known_te = y[even] != UNKNOWN, y[odd] != UNKNOWN
        if known_tr.sum() < 2 or not known_te.any():
            continue
        predict = fit_linear_probe(h[even][known_tr], y[even][known_tr], int(y.max()) + 1)
        out[f"probe/{a}"] = float((predict(h[odd][known_te]) == y[odd][known_te]).float().mean())
    if fair is not None:
        logits = fair.dac(normalize_h(h, fair.cfg.h_norm))
        for a in fair.cfg.attributes:
            y = attrs[a]
            known = y != UNKNOWN
            out[f"dac_acc/{a}"] = float((logits[a].argmax(-1)[known] == y[known]).float().mean())
            out[f"club/{a}"] = float(club(logits[a], y, fair.cfg.negatives))
    return out
