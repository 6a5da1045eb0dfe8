"""Tests of `loraens.ensemble`: the member-batched LoRA layer against PEFT, init, import/export, clipping.

The key property: member k of the vectorised model IS a standard PEFT LoRA adapter. Each member is
exported to a PEFT folder and loaded with `peft.PeftModel.from_pretrained` on a fresh copy of the
same tiny base model, and the two forwards must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from loraens.config import EnsembleConfig
from loraens.ensemble import (
    MemberLoraLinear,
    attach_members,
    clip_grad_norm_per_member,
    export_member,
    import_member,
    lora_parameters,
    member_layers,
)
from tests.conftest import DEVICE

# fp32 forwards of a 2-layer model through two different code paths (one bmm per layer for all
# members vs. PEFT's per-adapter nn.Linear calls) differ only by float summation order: ~1e-6.
ATOL = 1e-5


def ens_config(**kw) -> EnsembleConfig:
    return EnsembleConfig(**{"num_members": 3, "rank": 4, "alpha": 8.0, "init_scale": 2.0, "seed": 0, **kw})


def tokens(tokenizer, text: str = "Question: What is the colour of the sky?\nAnswer:") -> torch.Tensor:
    """Input ids [1, T] of `text`, on `DEVICE` (where `make_base` puts the model)."""
    return torch.tensor([tokenizer(text)["input_ids"]], device=DEVICE)


def member_logits(model, ids: torch.Tensor, m: int) -> torch.Tensor:
    """Full HF forward of the same input for every member: [M, B, T, V]."""
    with torch.no_grad():
        return model(ids.repeat(m, 1)).logits.view(m, ids.shape[0], *ids.shape[1:], -1)


def peft_state(peft_model) -> dict[str, torch.Tensor]:
    """lora_A / lora_B of PEFT's default adapter by the HF module name ("model.layers.0.self_attn.q_proj")."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            out[short + ".A"] = module.lora_A["default"].weight.detach()
            out[short + ".B"] = module.lora_B["default"].weight.detach()
    return out


# ---------------------------------------------------------------- attach_members


def test_attach_wraps_exactly_the_targets_and_freezes_the_base(base_model):
    cfg = ens_config(num_members=3, rank=4)
    layers = attach_members(base_model, cfg)
    n_layers = base_model.config.num_hidden_layers
    assert sorted(layers) == sorted(
        f"model.layers.{i}.self_attn.{t}" for i in range(n_layers) for t in ("q_proj", "v_proj")
    )
    assert set(member_layers(base_model)) == set(layers)
    for name, module in base_model.named_modules():
        if name.endswith(("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")):
            assert type(module) is nn.Linear, name
    trainable = {n for n, p in base_model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{w}" for n in layers for w in ("A", "B")}
    count = sum(p.numel() for p in base_model.parameters() if p.requires_grad)
    expected = sum(cfg.num_members * cfg.rank * (lay.base.in_features + lay.base.out_features)
                   for lay in layers.values())
    # q_proj is 32 -> 32 and v_proj 32 -> 16 (2 KV heads of 8) in the tiny Llama.
    assert expected == n_layers * cfg.num_members * cfg.rank * ((32 + 32) + (32 + 16))
    assert count == expected == sum(p.numel() for p in lora_parameters(base_model))
    for layer in layers.values():
        assert layer.lora_A.shape == (3, 4, layer.base.in_features)
        assert layer.lora_B.shape == (3, layer.base.out_features, 4)


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def test_attach_unknown_target_lists_the_linear_layers(base_model):
    with pytest.raises(ValueError) as err:
        attach_members(base_model, ens_config(target_modules=["qkv_proj"]))
    msg = str(err.value)
    assert "qkv_proj" in msg
    for name in LINEAR_NAMES:
        assert repr(name) in msg


def test_attach_unknown_target_next_to_a_valid_one(base_model):
    with pytest.raises(ValueError) as err:
        attach_members(base_model, ens_config(target_modules=["q_proj", "qkv_proj"]))
    msg = str(err.value)
    assert "qkv_proj" in msg and "'base'" not in msg
    for name in LINEAR_NAMES:
        assert repr(name) in msg
    assert not member_layers(base_model)  # the failed call left the model as it was


def test_attach_non_linear_target_is_an_error(base_model):
    with pytest.raises(ValueError, match="not an nn.Linear"):
        attach_members(base_model, ens_config(target_modules=["self_attn"]))


def test_wrong_row_count_is_an_error(base_model, tokenizer):
    attach_members(base_model, ens_config(num_members=3))
    with pytest.raises(ValueError, match="M=3"):
        base_model(tokens(tokenizer).repeat(2, 1))


def test_zero_B_members_equal_the_base_model(make_base, tokenizer):
    ids = tokens(tokenizer)
    model = make_base()
    attach_members(model, ens_config(num_members=3, init_scale=4.0))
    out = member_logits(model, ids, 3)
    # The base model on the same M*B rows: the same GEMM shapes, so the same kernels (on CUDA the
    # kernel, and with it the summation order, may depend on the row count).
    base = member_logits(make_base(), ids, 3)
    for k in range(3):
        # B = 0 makes the update exactly 0 (x A^T B^T with B = 0), so equality is exact.
        assert torch.equal(out[k], base[k])


# ---------------------------------------------------------------- init


def test_member_init_depends_only_on_seed_and_member(make_base):
    m2, m3, other = make_base(), make_base(), make_base()
    l2 = attach_members(m2, ens_config(num_members=2, seed=7))
    l3 = attach_members(m3, ens_config(num_members=3, seed=7))
    lo = attach_members(other, ens_config(num_members=2, seed=8))
    for name in l2:
        for k in range(2):
            assert torch.equal(l2[name].lora_A[k], l3[name].lora_A[k])
        assert not torch.equal(l3[name].lora_A[0], l3[name].lora_A[1])
        assert not torch.equal(l3[name].lora_A[1], l3[name].lora_A[2])
        assert not torch.equal(l2[name].lora_A[0], lo[name].lora_A[0])
        assert torch.count_nonzero(l3[name].lora_B) == 0
    # Layers of one member get different draws too.
    a, b = (l3[n].lora_A[0] for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("init_scale", [0.5, 4.0])
def test_init_scale_multiplies_the_kaiming_bound(make_base, init_scale):
    layers = attach_members(make_base(), ens_config(num_members=4, init_scale=init_scale))
    for layer in layers.values():
        bound = init_scale / math.sqrt(layer.base.in_features)  # PEFT's default: kaiming-uniform a=sqrt(5)
        a = layer.lora_A.detach()
        assert a.abs().max() <= bound
        # Uniform on [-bound, bound]: 4 * 4 * 32 = 512 draws reach far into the range.
        assert a.abs().max() > 0.9 * bound
        assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


# ---------------------------------------------------------------- PEFT export / import


def test_each_member_equals_its_exported_peft_adapter(make_base, tokenizer, tmp_path, randomize_B):
    cfg = ens_config(num_members=3, rank=4, alpha=8.0)
    model = make_base()
    layers = attach_members(model, cfg)
    randomize_B(layers, std=0.2)
    ids = tokens(tokenizer)
    out = member_logits(model, ids, 3)  # [M, B, T, V]
    for k in range(3):
        folder = export_member(model, k, tmp_path / f"member_{k}", cfg)
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        peft_model = PeftModel.from_pretrained(make_base(), str(folder)).to(DEVICE).eval()
        loaded = peft_state(peft_model)  # PEFT found every layer under the exported names
        assert set(loaded) == {f"{n}.{w}" for n in layers for w in ("A", "B")}
        for name, layer in layers.items():
            assert torch.equal(loaded[f"{name}.A"], layer.lora_A[k]) and torch.equal(loaded[f"{name}.B"],
                                                                                     layer.lora_B[k])
        with torch.no_grad():
            ref = peft_model(ids).logits
        torch.testing.assert_close(out[k], ref, atol=ATOL, rtol=0)
        # The members really differ from one another and from the base.
        if k:
            assert (out[k] - out[0]).abs().max() > 1e-3


def test_peft_forward_equivalence_with_a_batch_of_two(make_base, tokenizer, tmp_path, randomize_B):
    """B > 1: the member-major row layout (rows k*B..(k+1)*B-1) must line up with the members."""
    cfg = ens_config(num_members=2)
    model = make_base()
    randomize_B(attach_members(model, cfg), std=0.2, seed=3)
    a = tokenizer("Question: What is the colour of the sky?")["input_ids"]
    b = tokenizer("Answer: the sea is blue and cold!")["input_ids"]
    t = min(len(a), len(b))
    ids = torch.tensor([a[:t], b[:t]], device=DEVICE)
    out = member_logits(model, ids, 2)
    for k in range(2):
        peft_model = PeftModel.from_pretrained(make_base(), str(export_member(model, k, tmp_path / f"m{k}", cfg)))
        peft_model.to(DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(out[k], peft_model(ids).logits, atol=ATOL, rtol=0)


def test_import_round_trip(make_base, tmp_path, randomize_B):
    cfg = ens_config(num_members=3)
    src = make_base()
    randomize_B(attach_members(src, cfg))
    dst = make_base()
    dst_layers = attach_members(dst, ens_config(num_members=3, seed=99))
    # Member 0 of src -> slot 2 of dst, member 2 -> slot 0.
    import_member(dst, 2, export_member(src, 0, tmp_path / "m0", cfg))
    import_member(dst, 0, export_member(src, 2, tmp_path / "m2", cfg))
    src_layers = member_layers(src)
    for name, layer in dst_layers.items():
        assert torch.equal(layer.lora_A[2], src_layers[name].lora_A[0])
        assert torch.equal(layer.lora_B[2], src_layers[name].lora_B[0])
        assert torch.equal(layer.lora_A[0], src_layers[name].lora_A[2])
        assert torch.equal(layer.lora_B[0], src_layers[name].lora_B[2])


def _peft_saved_adapter(make_base, folder, r: int, alpha: float, seed: int = 5):
    """An adapter created, randomised and saved by PEFT itself; returns the live PEFT model."""
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_base(), lcfg).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.2).to(p.device))
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


@pytest.mark.parametrize("alpha", [8.0, 2.0])  # same alpha as the members, and a different one (rescaled)
def test_import_adapter_saved_by_peft(make_base, tokenizer, tmp_path, alpha):
    peft_model = _peft_saved_adapter(make_base, tmp_path / "peft", r=4, alpha=alpha)
    model = make_base()
    attach_members(model, ens_config(num_members=3, rank=4, alpha=8.0))
    import_member(model, 1, tmp_path / "peft")
    ids = tokens(tokenizer)
    out = member_logits(model, ids, 3)
    with torch.no_grad():
        ref = peft_model(ids).logits
    base = member_logits(make_base(), ids, 3)  # on the same M*B rows (see test_zero_B_members_equal_the_base_model)
    torch.testing.assert_close(out[1], ref, atol=ATOL, rtol=0)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])  # other slots untouched (B = 0)


def test_import_wrong_rank_is_an_error(make_base, tmp_path):
    _peft_saved_adapter(make_base, tmp_path / "peft", r=2, alpha=4.0)
    model = make_base()
    attach_members(model, ens_config(rank=4))
    with pytest.raises(ValueError, match="rank 2"):
        import_member(model, 0, tmp_path / "peft")


def test_import_missing_folder_is_an_error(make_base, tmp_path):
    model = make_base()
    attach_members(model, ens_config())
    with pytest.raises(FileNotFoundError):
        import_member(model, 0, tmp_path / "nothing")


# ---------------------------------------------------------------- clipping


def test_clip_grad_norm_per_member_matches_torch_per_member():
    gen = torch.Generator().manual_seed(0)
    m = 3
    shapes = [(m, 4, 32), (m, 32, 4), (m, 4, 32), (m, 16, 4)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    scale = torch.tensor([0.01, 1.0, 0.2])  # member 0 far below max_norm, member 1 far above
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale.view(-1, 1, 1)
    max_norm = 1.0
    originals = [p.grad.clone() for p in params]
    # Reference: every member's grads as separate tensors, clipped by torch on their own.
    refs = [[p.grad[k].clone() for p in params] for k in range(m)]
    ref_norms = []
    for k in range(m):
        holders = [nn.Parameter(torch.zeros_like(g)) for g in refs[k]]
        for h, g in zip(holders, refs[k]):
            h.grad = g
        ref_norms.append(torch.nn.utils.clip_grad_norm_(holders, max_norm))
        refs[k] = [h.grad for h in holders]
    assert ref_norms[0] < max_norm < ref_norms[1]  # one member clipped, one not
    norms = clip_grad_norm_per_member(params, max_norm)
    torch.testing.assert_close(norms, torch.stack(ref_norms), atol=1e-6, rtol=1e-6)
    for k in range(m):
        for p, g in zip(params, refs[k]):
            torch.testing.assert_close(p.grad[k], g, atol=1e-7, rtol=1e-6)
    # Hand check: the unclipped member's grads are unchanged; the clipped one's norm is max_norm.
    for p, g in zip(params, originals):
        assert torch.equal(p.grad[0], g[0])
    for k in (1, 2):
        norm = torch.sqrt(sum(p.grad[k].pow(2).sum() for p in params))
        assert norm.item() == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_skips_params_without_grads():
    p, q = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])
    norms = clip_grad_norm_per_member([p, q], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(p.grad, torch.tensor([[0.6, 0.8, 0.0], [0.3, 0.4, 0.0]]), atol=1e-6, rtol=0)
    assert q.grad is None


# ---------------------------------------------------------------- dropout


def test_dropout_only_in_train_mode(make_base, tokenizer, randomize_B):
    model = make_base()
    randomize_B(attach_members(model, ens_config(num_members=2, dropout=0.3)), std=0.2)
    ids = tokens(tokenizer).repeat(2, 1)
    model.train()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    assert (a - b).abs().max() > 1e-4
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_member_layer_forward_by_hand():
    """Hand check of one layer: member k's rows get base(x) + scaling * x A_k^T B_k^T."""
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = MemberLoraLinear(base, num_members=2, rank=2, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    layer.to(DEVICE)  # base too: it is a submodule
    x = torch.randn(2 * 3, 7, 5).to(DEVICE)  # M=2 members, B=3 rows each, 7 tokens
    out = layer(x)
    for k in range(2):
        xk = x[3 * k: 3 * (k + 1)]
        ref = base(xk) + 2.0 * (xk @ layer.lora_A[k].T @ layer.lora_B[k].T)
        torch.testing.assert_close(out[3 * k: 3 * (k + 1)], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])  # the default update, and plain autograd
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_member_layer_gradients_match_autograd_reference(x_dtype, fused):
    """Both update paths give the outputs and gradients of autograd through
    `base(x) + scaling * x A_k^T B_k^T`, computed member by member in float64."""
    torch.manual_seed(0)
    m, rows, t, d_in, d_out, r = 3, 2, 5, 12, 7, 4
    base = nn.Linear(d_in, d_out).to(x_dtype).requires_grad_(False)
    layer = MemberLoraLinear(base, num_members=m, rank=r, alpha=8.0, dropout=0.0)
    layer.fused_update = fused
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    layer.to(DEVICE)  # LoRA weights stay float32: `.to(device)` changes no dtype
    x = torch.randn(m * rows, t, d_in).to(x_dtype).to(DEVICE).requires_grad_(True)
    weights = torch.randn(m * rows, t, d_out).to(DEVICE)  # a loss that weighs every output differently
    (layer(x).float() * weights).sum().backward()

    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w64, bias64 = base.weight.double(), base.bias.double()
    ref = torch.cat([x64[k * rows:(k + 1) * rows] @ w64.T + bias64
                     + 2.0 * (x64[k * rows:(k + 1) * rows] @ a64[k].T @ b64[k].T) for k in range(m)])
    (ref * weights.double()).sum().backward()
    tol = {"atol": 1e-4, "rtol": 1e-4} if x_dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    torch.testing.assert_close(layer.lora_A.grad.double(), a64.grad, **tol)
    torch.testing.assert_close(layer.lora_B.grad.double(), b64.grad, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    with torch.no_grad():
        torch.testing.assert_close(layer(x.detach()).double(), ref.detach(), **tol)


def test_member_layer_frozen_input_and_active_members():
    """Without a gradient for x (the first layer) and under `active_members`, only the active
    members' A and B get gradients, and those match the full layer's."""
    torch.manual_seed(1)
    base = nn.Linear(6, 4).requires_grad_(False)
    layer = MemberLoraLinear(base, num_members=3, rank=2, alpha=2.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    layer.to(DEVICE)
    x = torch.randn(3 * 2, 6).to(DEVICE)
    layer(x).pow(2).sum().backward()
    full_a, full_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.zero_grad()
    layer.active = slice(1, 3)
    layer(x[2:]).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad[0]) == 0 and torch.count_nonzero(layer.lora_B.grad[0]) == 0
    torch.testing.assert_close(layer.lora_A.grad[1:], full_a[1:])
    torch.testing.assert_close(layer.lora_B.grad[1:], full_b[1:])
