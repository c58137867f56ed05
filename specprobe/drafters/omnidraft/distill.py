"""Online distillation of a cross-vocabulary drafter (OmniDraft, arXiv 2507.02659, section 3.3).

While it serves, the drafter learns the target's habits on the user's own text. After each request
(between requests, so no step of a generation waits for it) one small update of a LoRA adapter
(`peft`) on every layer of the drafter, with OmniDraft's hybrid loss over the request's output:

- a generated target token that is exactly ONE draft token of the direct map: reverse KL from the
  drafter's distribution to the target's, both restricted to the directly mapped vocabulary and
  renormalised (the target's distribution was recorded during verification);
- a target token made of SEVERAL draft tokens (an n-gram of the vocabulary bridge): the negative
  log-likelihood of those draft tokens;
- a token whose boundaries fall inside draft tokens teaches nothing.

`align_for_distillation` finds which is which from the two tokenizations' byte offsets. The
adapter lives on a copy of the drafter whose base weights are SHARED with the user's model and
frozen there (the user's model object is not touched); the target never changes, so the emitted
tokens cannot change either: only how many of them each verification accepts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...errors import InvalidOptionError

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DistillConfig:
    rank: int = 8  # LoRA rank
    lr: float = 2e-3  # AdamW learning rate of one update
    layers: int | None = None  # LoRA on the drafter's last N decoder layers (None: all)
    nll_weight: float = 1.0  # weight of the n-gram NLL term against the reverse KL term
    max_tokens: int = 256  # an update learns from at most the last N generated target tokens

    def __post_init__(self):
        for name in ("rank", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidOptionError(f"distillation option {name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise InvalidOptionError(f"distillation learning rate must be in (0, 1), got {self.lr!r}")


@dataclass
class Alignment:
    """Which draft tokens learn from which target token (indices into the two id lists)."""

    kl: list[tuple[int, int]] = field(default_factory=list)  # (draft index j, target index k): j is k's one directly mapped draft token
    nll: list[int] = field(default_factory=list)  # draft indices j that are parts of an n-gram-mapped target token


def align_for_distillation(
    draft_ids: list[int], draft_lengths: list[int], target_ids: list[int], target_lengths: list[int], target_start: int, direct: dict[int, int]
) -> Alignment:
    """Align two tokenizations of one text (byte lengths of each token) for the hybrid loss.

    The target tokens cover the text's bytes from `target_start` on (the generated part); the
    draft tokens cover all of it. A target token whose byte span is exactly one draft token that
    the direct map sends to it is a KL item; exactly two or more draft tokens, NLL items; else
    nothing. The first draft token is never an item (no row predicts it).

    Example (strings for ids, lengths in bytes): draft ['Hi', ' f', 'la', 'ke', '!'] (2,2,2,2,1),
    target [' f', 'lake', '!'] (2,4,1) from byte 2, direct {' f': ' f', '!': '!'}
    -> kl [(1, 0), (4, 2)] (' f' and '!'), nll [2, 3] ('la' 'ke' make 'lake').
    >>> a = align_for_distillation([0, 1, 2, 3, 4], [2, 2, 2, 2, 1], [10, 11, 12], [2, 4, 1], 2, {1: 10, 4: 12})
    >>> a.kl, a.nll
    ([(1, 0), (4, 2)], [2, 3])
    """
    starts, pos = {}, 0
    for j, n in enumerate(draft_lengths):
        starts[pos] = j
        pos += n
    starts[pos] = len(draft_lengths)  # the end of the text
    out, begin = Alignment(), target_start
    for k, n in enumerate(target_lengths):
        end = begin + n
        if begin in starts and end in starts:
            a, b = starts[begin], starts[end]
            if a >= 1 and b - a == 1 and direct.get(draft_ids[a]) == target_ids[k]:
                out.kl.append((a, k))
            elif a >= 1 and b - a >= 2:
                out.nll.extend(range(a, b))
        begin = end
    return out


def hybrid_loss(
    draft_logits: torch.Tensor,  # [n_rows, draft vocab]: row i predicts draft token i + 1 of the fed span
    kl_rows: torch.Tensor,  # [n_kl]: rows whose next token is directly mapped
    target_logprobs: torch.Tensor,  # [n_kl, n_shared]: the target's log-probabilities over the shared vocabulary
    shared_draft_ids: torch.Tensor,  # [n_shared]: the draft ids of the shared vocabulary, in the target columns' order
    nll_rows: torch.Tensor,  # [n_nll]
    nll_labels: torch.Tensor,  # [n_nll]: the draft token each of those rows should predict
    nll_weight: float = 1.0,
) -> torch.Tensor:
    """Reverse KL(draft || target) on directly mapped tokens + nll_weight x NLL on n-gram parts."""
    loss = draft_logits.new_zeros(())
    if len(kl_rows):
        q = torch.log_softmax(draft_logits[kl_rows][:, shared_draft_ids].float(), dim=-1)  # [n_kl, n_shared]
        loss = loss + (q.exp() * (q - target_logprobs)).sum(-1).mean()
    if len(nll_rows):
        loss = loss + nll_weight * F.cross_entropy(draft_logits[nll_rows].float(), nll_labels)
    return loss


def adapted_copy(model, config: DistillConfig):
    """A copy of `model` with LoRA adapters on its last decoder layers. Its base weights are the
    model's own storage, frozen (new Parameter objects: the model's own flags stay as they were)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InvalidOptionError("online distillation needs peft: pip install 'specprobe[adapt]' (or use omnidraft-frozen)") from None
    n_layers = model.config.num_hidden_layers
    layers = config.layers or n_layers
    if not 1 <= layers <= n_layers:
        raise InvalidOptionError(f"distillation option layers must be in [1, {n_layers}], got {layers}")
    with torch.inference_mode(False):
        memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
        memo.update({id(b): b for b in model.buffers()})
        twin = copy.deepcopy(model, memo)
        lora = LoraConfig(
            r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0, target_modules=list(LORA_MODULES),
            layers_to_transform=list(range(n_layers - layers, n_layers)), layers_pattern="layers",
        )
        twin = inject_adapter_in_model(lora, twin)
        for name, p in twin.named_parameters():
            p.requires_grad_("lora_" in name)
    return twin.eval()


def merged_copy(adapted):
    """A copy of an `adapted_copy` for drafting: each LoRA-wrapped layer becomes a plain nn.Linear
    with its own weight (base + LoRA delta, see `merge`), so drafting pays nothing for the adapter;
    everything else is shared. Returns (the copy, [(its Linear, the LoRA layer it mirrors)])."""
    from peft.tuners.lora import LoraLayer

    with torch.inference_mode(False):
        memo = {id(t): t for t in [*adapted.parameters(), *adapted.buffers()]}
        twin = copy.deepcopy(adapted, memo)
        pairs = []
        for (_, module), (_, original) in zip(list(twin.named_modules()), list(adapted.named_modules())):
            for (name, child), (_, lora) in zip(list(module.named_children()), list(original.named_children())):
                if isinstance(child, LoraLayer):
                    base = child.get_base_layer()
                    linear = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
                    linear.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
                    linear.bias = base.bias
                    setattr(module, name, linear)
                    pairs.append((linear, lora))
    return twin.eval(), pairs


class OnlineDistiller:
    """The adapted drafter (`model`, trained), its merged twin (`draft_model`, drafts), the optimizer
    and the update step."""

    def __init__(self, model, config: DistillConfig | None = None):
        self.config = config or DistillConfig()
        self.model = adapted_copy(model, self.config)
        self.draft_model, self._merged = merged_copy(self.model)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=self.config.lr, weight_decay=0.0)
        self.updates = 0
        self.seconds = 0.0  # total time in `update`
        self.losses: list[float] = []

    @torch.no_grad()
    def merge(self) -> None:
        """Write base + scaling x B @ A into the drafting twin's weights (after every change of the
        adapter): one pass over each weight, no temporary delta matrix."""
        with torch.inference_mode(False):
            for linear, lora in self._merged:
                a, b = lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach()  # [r, in], [out, r]
                torch.addmm(lora.get_base_layer().weight, b, a, alpha=lora.scaling["default"], out=linear.weight)

    def update(
        self,
        backend,
        draft_ids: list[int],
        past_len: int,
        past_cache,
        alignment: Alignment,
        target_logprobs: torch.Tensor,  # [n_targets, n_shared], row k for target token k of the alignment
        shared_draft_ids: torch.Tensor,  # [n_shared]
    ) -> float | None:
        """One optimizer step on one request. The drafter is fed draft_ids[past_len:] after the
        first `past_len` positions of `past_cache` (its inference cache in `backend`, the torch
        backend that ran it: rows computed by the same weights); returns the loss, or None when
        there was nothing to learn."""
        rows_of = lambda j: j - 1 - past_len  # noqa: E731  (the fed row that predicts draft token j)
        kl = [(j, k) for j, k in alignment.kl if rows_of(j) >= 0]
        nll = [j for j in alignment.nll if rows_of(j) >= 0]
        if not kl and not nll:
            return None
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            past = backend.prefix_copy(past_cache, past_len) if past_len else None
            ids = torch.tensor([draft_ids[past_len:]])
            positions = torch.arange(past_len, len(draft_ids))[None]
            logits = self.model(input_ids=ids, position_ids=positions, use_cache=True, **backend.cache_argument(self.model, past)).logits[0]
            loss = hybrid_loss(
                logits,
                torch.tensor([rows_of(j) for j, _ in kl], dtype=torch.long),
                target_logprobs.clone()[[k for _, k in kl]],
                shared_draft_ids.clone(),
                torch.tensor([rows_of(j) for j in nll], dtype=torch.long),
                torch.tensor([draft_ids[j] for j in nll], dtype=torch.long),
                self.config.nll_weight,
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
            self.optimizer.step()
        self.merge()
        self.updates += 1
        self.seconds += time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def state_dict(self) -> dict:
        return {
            "adapter": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
            "losses": self.losses[-1000:],
        }

    def load_state_dict(self, state: dict, where: str) -> None:
        adapter = state.get("adapter", {})
        mismatch = sorted(set(adapter) ^ set(self.params)) or [n for n in adapter if adapter[n].shape != self.params[n].shape]
        if mismatch:
            raise InvalidOptionError(
                f"{where} holds an adapter for a different drafter or LoRA setting (first mismatch: {mismatch[0]}); use another --adapt-state file"
            )
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(adapter[n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.merge()
        self.updates = int(state.get("updates", 0))
        self.losses = list(state.get("losses", []))
