"""The PEFT-sequential baseline: one `peft` model holding M LoRA adapters, float32, trained one
adapter after another through `set_adapter`, scored from a plain HF forward with full-vocabulary
logits at every position; evaluated adapter by adapter or in PEFT's mixed batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraens.batching import length_sorted_batches
from loraens.config import Scoring
from loraens.ensemble import member_layers
from loraens.prompts import EncodedQuestion

from .common import ALPHA, LR, MAX_GRAD_NORM, RANK, TARGETS, Task


def pad_right(seqs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def peft_scores(pm, qs: list[EncodedQuestion], task: Task, c: int, adapter_names: list[str] | None = None,
                ) -> torch.Tensor:
    """Choice scores [len(qs), c] (-inf for missing choices) from the standard HF forward.

    `pm(input_ids, attention_mask).logits` forms full-vocabulary fp32 logits at every position.
    Letter: the last real position's logits restricted to the letter tokens. Choice-likelihood:
    one sequence per (question, choice), the mean log-probability of the choice's tokens from a
    full-vocabulary log-softmax. `adapter_names` (one per question) selects PEFT's mixed batch.
    """
    n = len(qs)
    device = next(pm.parameters()).device
    if task.scoring is Scoring.LETTER:
        ids, mask = (x.to(device) for x in pad_right([q.prompt_ids for q in qs]))
        kw = {} if adapter_names is None else {"adapter_names": adapter_names}
        logits = pm(input_ids=ids, attention_mask=mask, **kw).logits  # [B, T, V]
        last = mask.sum(1) - 1
        scores = logits[torch.arange(n, device=device), last][:, list(task.letter_ids[:c])].float()
        exists = torch.tensor([[j < q.num_choices for j in range(c)] for q in qs], device=device)
        return scores.masked_fill(~exists, float("-inf"))
    seqs, rows, cols, spans, names = [], [], [], [], []
    for i, q in enumerate(qs):
        for j, cont in enumerate(q.continuations):
            seqs.append(q.prompt_ids + cont)
            rows.append(i)
            cols.append(j)
            spans.append((len(q.prompt_ids), len(cont)))
            if adapter_names is not None:
                names.append(adapter_names[i])
    ids, mask = (x.to(device) for x in pad_right(seqs))
    kw = {} if adapter_names is None else {"adapter_names": names}
    logits = pm(input_ids=ids, attention_mask=mask, **kw).logits  # [S, T, V]
    logp = logits[:, :-1].float().log_softmax(-1)  # float32, as HF losses are (the base may be bf16)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [S, T-1]: log p(token t+1 | tokens <= t)
    sel = torch.zeros_like(tok, dtype=torch.bool)
    for s, (p, length) in enumerate(spans):
        sel[s, p - 1: p - 1 + length] = True
    per_seq = torch.where(sel, tok, torch.zeros_like(tok)).sum(1) / sel.sum(1)  # mean over choice tokens
    scores = torch.full((n, c), float("-inf"), device=device, dtype=per_seq.dtype)
    return scores.index_put((torch.tensor(rows, device=device), torch.tensor(cols, device=device)), per_seq)


def build_peft(base, num_adapters: int, lr: float = LR, weight_decay: float = 0.01):
    """One PeftModel with adapters m0..m{n-1}; one AdamW per adapter over its own parameters.

    The defaults are those of the throughput sides (`build_loraens`: torch's AdamW defaults at
    `LR`); the quality run passes its own, the same as its loraens sides'.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(base, cfg, adapter_name="m0")
    for k in range(1, num_adapters):
        pm.add_adapter(f"m{k}", cfg)
    params, opts = [], []
    for k in range(num_adapters):
        ps = [p for n, p in pm.named_parameters() if "lora_" in n and f".m{k}." in n]
        assert ps, f"no parameters for adapter m{k}"
        params.append(ps)
        opts.append(torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay))
    pm.train()
    return pm, params, opts


def peft_member_step(pm, params, opts, k: int, qs: list[EncodedQuestion], task: Task) -> None:
    pm.set_adapter(f"m{k}")
    scores = peft_scores(pm, qs, task, task.num_choices)
    targets = torch.tensor([q.answer for q in qs], device=scores.device)
    F.cross_entropy(scores.float(), targets).backward()
    torch.nn.utils.clip_grad_norm_(params[k], MAX_GRAD_NORM)
    opts[k].step()
    opts[k].zero_grad(set_to_none=True)


@torch.no_grad()
def peft_eval_loop(pm, task: Task, m: int, batch_size: int) -> torch.Tensor:
    """[N, M, C] member probabilities: for each adapter, set_adapter then all question batches."""
    pm.eval()
    qs = task.eval_q
    out = torch.zeros(len(qs), m, task.eval_choices)
    batches = length_sorted_batches(qs, batch_size)
    for k in range(m):
        pm.set_adapter(f"m{k}")
        for idx in batches:
            out[idx, k] = peft_scores(pm, [qs[i] for i in idx], task, task.eval_choices).float().softmax(-1).cpu()
    return out


@torch.no_grad()
def peft_eval_mixed(pm, task: Task, m: int, batch_size: int) -> torch.Tensor:
    """[N, M, C] via PEFT's mixed-batch forward: every forward holds batch_size // M questions x M adapters."""
    pm.eval()
    qs = task.eval_q
    out = torch.zeros(len(qs), m, task.eval_choices)
    for idx in length_sorted_batches(qs, max(1, batch_size // m)):
        sub = [qs[i] for i in idx]
        names = [f"m{k}" for k in range(m) for _ in sub]
        probs = peft_scores(pm, sub * m, task, task.eval_choices, adapter_names=names).float().softmax(-1).cpu()
        out[idx] = probs.view(m, len(idx), -1).transpose(0, 1)
    return out


@torch.no_grad()
def copy_members_into_peft(model, pm, m: int) -> None:
    """Give PEFT adapters m0..m{M-1} the weights of loraens members 0..M-1 (same scaling alpha/r)."""
    inner = pm.base_model.model
    for name, layer in member_layers(model).items():
        target = inner.get_submodule(name)
        for k in range(m):
            target.lora_A[f"m{k}"].weight.copy_(layer.lora_A[k].float())
            target.lora_B[f"m{k}"].weight.copy_(layer.lora_B[k].float())
