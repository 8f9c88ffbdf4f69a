"""Plans that remove attention heads and FFN neurons, applied to plain-torch BERT and Llama."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from safetensors.torch import load_file, save_file
from torch import nn

from clients import PlanMismatchError, apply_plan, build_manifest
from graphs import analyze
from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import read_checkpoint
from tests.clients.bert import BertConfig, BertModel
from tests.clients.llama import LlamaConfig, LlamaModel

SMALL_BERT = BertConfig(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)


def _save(model: nn.Module, folder: Path, config: dict[str, int] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(SMALL_BERT).eval()


def _llama(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel().eval()


def _plan(folder: Path, target: float = 0.3, method: str = "l1") -> PruningPlan:
    ckpt = read_checkpoint(folder)
    return plan_layers(
        ckpt.layers,
        method=method,  # type: ignore[arg-type]
        target=Target(params=target),
        params_total=ckpt.info.n_params,
        checkpoint_sha256=ckpt.info.sha256,
    )


def _masked(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """The unpruned model with the planned heads/neurons silenced: their columns of o and down
    zeroed. Removing them must give exactly this function."""
    with torch.no_grad():
        for gp in plan.groups:
            for pa in gp.params:
                if pa.axis == 1:
                    w = model.get_parameter(pa.param)
                    for i in gp.remove:
                        w[:, i * pa.per_channel : (i + 1) * pa.per_channel] = 0
    return model


def _check_pruned(
    make: Callable[[], nn.Module], folder: Path, plan: PruningPlan, x: torch.Tensor
) -> nn.Module:
    reference = _masked(make(), plan)
    pruned = apply_plan(make(), plan, x, checkpoint_sha256=plan.checkpoint_sha256)
    shapes = {n: list(p.shape) for n, p in pruned.named_parameters()}
    assert {n: shapes[n] for n in plan.expected_shapes} == plan.expected_shapes
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    with torch.no_grad():
        torch.testing.assert_close(_first(pruned(x)), _first(reference(x)), rtol=1e-4, atol=1e-5)
    return pruned


def _first(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def test_bert_heads_and_neurons_are_removed_and_the_function_is_the_masked_one(
    tmp_path: Path,
) -> None:
    cfg = {"num_attention_heads": 4, "hidden_size": 32}
    folder = _save(_bert(), tmp_path / "bert", cfg)
    plan = _plan(folder)
    units = {gp.unit for gp in plan.groups if gp.remove}
    assert units == {"heads", "neurons"}
    x = torch.randint(1, 50, (2, 7))
    pruned = _check_pruned(_bert, folder, plan, x)
    for gp in plan.groups:
        if gp.unit == "heads":
            attn = pruned.get_submodule(gp.producers[0].rpartition(".")[0])
            assert attn.num_attention_heads == gp.channels_after  # MHA: a vertex is a head
            assert attn.attention_head_size == 8  # the head size stays


def test_an_empty_plan_changes_nothing(tmp_path: Path) -> None:
    folder = _save(_bert(), tmp_path / "bert", {"num_attention_heads": 4})
    plan = _plan(folder)
    empty = plan.model_copy(
        update={
            "groups": [
                g.model_copy(update={"remove": [], "channels_after": g.channels_before})
                for g in plan.groups
            ],
            "expected_shapes": {n: list(p.shape) for n, p in _bert().named_parameters()},
            "params_after": plan.params_before,
        }
    )
    x = torch.randint(1, 50, (2, 7))
    model = _bert()
    before = model(x)
    apply_plan(model, empty, x)
    after = model(x)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gqa_plans_remove_whole_kv_groups(tmp_path: Path) -> None:
    c = LlamaConfig()
    cfg = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8}
    folder = _save(_llama(), tmp_path / "llama", cfg)
    ckpt = read_checkpoint(folder)
    report = analyze(ckpt.layers, checkpoint=ckpt.info, skipped=ckpt.skipped, methods=["mrp"])
    assert [(r.kind, r.n_filters) for r in report.layers] == [("ffn", 96), ("attention", 2)] * 2
    plan = _plan(folder, target=0.35)
    heads = [gp for gp in plan.groups if gp.unit == "heads" and gp.remove]
    assert heads, "the plan removes a k/v group"
    x = torch.randint(0, c.vocab_size, (2, 5))
    pruned = _check_pruned(_llama, folder, plan, x)
    for gp in heads:
        attn = pruned.get_submodule(gp.producers[0].rpartition(".")[0])
        assert (attn.num_heads, attn.num_key_value_heads) == (
            4 * gp.channels_after,
            gp.channels_after,
        )
        assert attn.q_proj.out_features == attn.num_heads * attn.head_dim


def test_without_config_attention_is_skipped_and_ffn_is_planned(tmp_path: Path) -> None:
    folder = _save(_bert(), tmp_path / "bert", None)
    ckpt = read_checkpoint(folder)
    report = analyze(ckpt.layers, checkpoint=ckpt.info, skipped=ckpt.skipped, methods=["l1"])
    assert {r.kind for r in report.layers} == {"ffn", "linear"}  # + the pooler
    assert sum("number of heads" in s.reason for s in report.skipped) == 8
    plan = _plan(folder)
    assert {gp.unit for gp in plan.groups if gp.remove} == {"neurons"}
    _check_pruned(_bert, folder, plan, torch.randint(1, 50, (2, 7)))


def test_a_heads_plan_for_another_model_is_refused_before_any_change(tmp_path: Path) -> None:
    folder = _save(_bert(), tmp_path / "bert", {"num_attention_heads": 4})
    plan = _plan(folder)
    other = BertModel(BertConfig(**{**SMALL_BERT.__dict__, "num_attention_heads": 2})).eval()
    before = {n: p.clone() for n, p in other.state_dict().items()}
    with pytest.raises(PlanMismatchError, match="num_attention_heads = 2"):
        apply_plan(other, plan, torch.randint(1, 50, (1, 4)))
    assert all(torch.equal(before[n], p) for n, p in other.state_dict().items())


def test_a_manifest_gives_heads_and_exact_flops(tmp_path: Path) -> None:
    folder = _save(_bert(), tmp_path / "bert", None)  # heads from the manifest only
    x = torch.randint(1, 50, (1, 7))
    manifest = build_manifest(_bert(), x)
    assert [a.heads.num_heads for a in manifest.attention] == [4, 4]
    ckpt = read_checkpoint(folder)
    plan = plan_layers(
        ckpt.layers,
        method="mrp",
        target=Target(flops=0.3),
        params_total=ckpt.info.n_params,
        manifest=manifest,
    )
    assert {gp.unit for gp in plan.groups if gp.remove} == {"heads", "neurons"}
    pruned = _check_pruned(_bert, folder, plan, x)
    macs, params = tp.utils.count_ops_and_params(pruned, x)
    assert params == plan.params_after
    assert plan.flops_after is not None and abs(macs - plan.flops_after) <= 0.01 * plan.flops_after


# --------------------------------------------------------------------------- the real MiniLM


@pytest.mark.real
def test_minilm_analysis_plan_and_apply(minilm: Path) -> None:
    from tests.clients.bert import minilm as make_minilm

    t0 = time.perf_counter()
    ckpt = read_checkpoint(minilm / "model.safetensors")
    report = analyze(ckpt.layers, checkpoint=ckpt.info, skipped=ckpt.skipped, methods=["mrp"])
    seconds = time.perf_counter() - t0
    groups = {(r.kind, r.n_filters) for r in report.layers}
    assert groups == {("attention", 12), ("ffn", 1536), ("linear", 384)}
    assert sum(r.kind == "attention" for r in report.layers) == 6
    assert sum(r.kind == "ffn" for r in report.layers) == 6
    red = [r.methods["mrp"].redundancy or 0.0 for r in report.layers if r.kind == "ffn"]
    assert 0 < max(red) < 0.1 and min(red) >= 0  # a few near-duplicate neurons, no nonsense
    assert seconds < 120

    state = load_file(str(minilm / "model.safetensors"))

    def make() -> nn.Module:
        model = make_minilm().eval()
        model.load_state_dict(state, strict=True)
        return model

    plan = plan_layers(
        ckpt.layers,
        method="mrp",
        target=Target(params=0.15),
        params_total=ckpt.info.n_params,
        checkpoint_sha256=ckpt.info.sha256,
    )
    assert {gp.unit for gp in plan.groups if gp.remove} == {"heads", "neurons"}
    _check_pruned(make, minilm, plan, torch.randint(1, 30000, (2, 12)))
