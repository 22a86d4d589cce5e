"""PEFT's LoRA variants as backbone settings: DoRA adds magnitude vectors, rsLoRA scales by alpha/sqrt(r), LoRA+
trains the B matrices at a multiple of the learning rate (two optimiser groups, in every stage), and
``lit-ft estimate`` counts each variant's parameters as PEFT does."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from lit_ft.backbone import Backbone, LoraSettings, TinyConfig, build_model, load_adapter, save_adapter
from lit_ft.errors import ConfigError
from lit_ft.rl.rewards import ExactMatchReward
from lit_ft.stages.causal_lm import CausalLM
from lit_ft.stages.ppo import PPO
from lit_ft.stages.reward_model import RewardModel
from lit_ft.stages.schedules import WarmupCosine
from lit_ft.tools.estimate import main as estimate_main
from tests.tiny_models import ROOT, TINY

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(tokenizer, seed: int = 0, **lora):
    torch.manual_seed(seed)
    settings = LoraSettings(**{"r": 4, "alpha": 8, "dropout": 0.0, "adapter_name": "sft", **lora})
    return build_model(Backbone(pretrained=None, tiny=TINY, lora=settings), tokenizer).eval()


def _adapted_linears(model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _ids() -> torch.Tensor:
    return torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------ DoRA
def test_dora_adds_a_trained_magnitude_per_output_feature_and_saves_it(tokenizer, tmp_path) -> None:
    plain, dora = _model(tokenizer), _model(tokenizer, use_dora=True)
    assert not any("magnitude" in n for n, _ in plain.named_parameters())
    layers = _adapted_linears(dora)
    assert len(layers) == len(ADAPTED) * TINY.num_hidden_layers
    for layer in layers.values():
        magnitude = layer.lora_magnitude_vector["sft"].weight
        base = layer.get_base_layer().weight
        assert magnitude.requires_grad and magnitude.shape == (base.shape[0],)
        # DoRA's initialisation: m = ||W||, one norm per output row, so that the adapted weight starts as W
        torch.testing.assert_close(magnitude.detach(), base.detach().norm(dim=1))
    with torch.no_grad():  # B = 0 at the start: DoRA changes nothing yet
        torch.testing.assert_close(dora(_ids()).logits, plain(_ids()).logits)
    trainable = {n for n, p in dora.named_parameters() if p.requires_grad}
    extra = trainable - {n for n, p in plain.named_parameters() if p.requires_grad}
    assert extra and all(".lora_magnitude_vector.sft." in n for n in extra)
    assert len(extra) == len(layers)

    with torch.no_grad():  # train it a little, by hand: the saved adapter must carry B and the magnitudes
        for name, p in dora.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    directory = save_adapter(dora, tmp_path / "dora", "sft", tokenizer)
    assert json.loads((directory / "adapter_config.json").read_text())["use_dora"] is True
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
        assert sum("lora_magnitude_vector" in k for k in f.keys()) == len(layers)  # noqa: SIM118
    torch.manual_seed(0)
    reloaded = load_adapter(build_model(Backbone(pretrained=None, tiny=TINY, lora=None), tokenizer),
                            str(directory), "sft").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, dora(_ids()).logits)


# ---------------------------------------------------------------------------------------------------- rsLoRA
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(tokenizer) -> None:
    r, alpha = 16, 16
    plain = _model(tokenizer, r=r, alpha=alpha)
    stable = _model(tokenizer, r=r, alpha=alpha, use_rslora=True)
    assert {m.scaling["sft"] for m in _adapted_linears(plain).values()} == {alpha / r}  # 1.0
    assert {m.scaling["sft"] for m in _adapted_linears(stable).values()} == {alpha / math.sqrt(r)}  # 4.0
    # the same A and B give an update sqrt(r) times larger (the base output is the same)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    layers = [dict(m.named_modules())[name] for m in (plain, stable)]
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(r, TINY.hidden_size, generator=g), torch.randn(TINY.hidden_size, r, generator=g)
    x = torch.randn(3, TINY.hidden_size, generator=g)
    deltas = []
    with torch.no_grad():
        for layer in layers:
            layer.lora_A["sft"].weight.copy_(a)
            layer.lora_B["sft"].weight.copy_(b)
            deltas.append(layer(x) - layer.get_base_layer()(x))
    torch.testing.assert_close(deltas[0], x @ a.T @ b.T * (alpha / r))
    torch.testing.assert_close(deltas[1], deltas[0] * math.sqrt(r))


# ----------------------------------------------------------------------------------------------------- LoRA+
def _optimizers(module, total_steps: int = 10):
    """``configure_optimizers`` of a stage, its model built, under a trainer that only knows the run length."""
    module.configure_model()
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    config = module.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def _stages(ratio: float | None) -> dict:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, loraplus_lr_ratio=ratio)
    adam = lambda p: torch.optim.AdamW(p, lr=1e-3)
    schedule = lambda o: WarmupCosine(o, warmup_steps=2)
    backbone = lambda name: Backbone(pretrained=None, tiny=TINY, lora=dataclasses.replace(lora, adapter_name=name))
    return {
        "CausalLM": lambda: CausalLM(backbone("sft"), optimizer=adam, scheduler=schedule),
        "RewardModel": lambda: RewardModel(backbone("reward"), optimizer=adam, scheduler=schedule),
        "PPO": lambda: PPO(backbone("default"), policy_adapter=None, reward_model=None, value_init="fresh",
                           rewards=[ExactMatchReward()], optimizer=adam, scheduler=schedule),
    }


@pytest.mark.parametrize("stage", ["CausalLM", "RewardModel", "PPO"])
def test_loraplus_trains_b_matrices_at_ratio_times_the_lr_in_every_stage(stage: str) -> None:
    torch.manual_seed(0)
    module = _stages(16.0)[stage]()
    optimizer, scheduler = _optimizers(module)
    names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    assert len(optimizer.param_groups) == 2
    rest, b = optimizer.param_groups
    assert {names[id(p)] for p in b["params"]} == {n for n in names.values() if ".lora_B." in n}
    assert {names[id(p)] for p in rest["params"]} == {n for n in names.values() if ".lora_B." not in n}
    assert any(".lora_A." in names[id(p)] for p in rest["params"])
    if stage != "CausalLM":  # the score / value head trains at the plain learning rate
        assert any("lora" not in names[id(p)] for p in rest["params"])
    peak = 1e-3
    for step in range(6):  # the scheduler scales both groups alike: warm-up then cosine, ratio kept
        factor = scheduler._factor(step)
        assert rest["lr"] == pytest.approx(peak * factor) and b["lr"] == pytest.approx(16 * peak * factor)
        optimizer.step()
        scheduler.step()
    assert scheduler.base_lrs == pytest.approx([peak, 16 * peak])


@pytest.mark.parametrize("stage", ["CausalLM", "RewardModel", "PPO"])
def test_without_loraplus_one_group_at_the_lr(stage: str) -> None:
    torch.manual_seed(0)
    module = _stages(None)[stage]()
    optimizer, _ = _optimizers(module)
    assert len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == sum(p.requires_grad for p in module.parameters())


def test_loraplus_ratio_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be positive"):
        LoraSettings(loraplus_lr_ratio=0)


def test_a_bad_loraplus_ratio_on_the_command_line_is_one_line(capsys) -> None:
    from tests.quantised_loading import fails_in_one_line

    fails_in_one_line(capsys, ["fit", "--config", str(ROOT / "configs/sft.yaml"),
                               "--model.init_args.backbone.lora.loraplus_lr_ratio", "-1"],
                      "loraplus_lr_ratio must be positive")


# ------------------------------------------------------------------------------------------------- estimate
@pytest.mark.parametrize("variant", ["lora", "use_dora", "use_rslora", "loraplus_lr_ratio"])
def test_estimate_counts_each_variants_parameters_as_peft_does(variant: str, tokenizer, capsys) -> None:
    """``lit-ft estimate`` on the SFT config (the tiny from-scratch shape) against PEFT's count of the model the
    same settings build: DoRA adds its magnitudes; rsLoRA and LoRA+ add nothing."""
    value = {"lora": None, "use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 16.0}[variant]
    overrides = [] if value is None else [f"--model.init_args.backbone.lora.{variant}", str(value).lower()]
    estimate_main(["--config", str(ROOT / "configs/sft.yaml"), "--model.init_args.backbone.pretrained", "null",
                   "--json", *overrides])
    report = json.loads(capsys.readouterr().out)
    counted = next(x for x in report["lines"] if x["name"].startswith("trainable LoRA"))["count"]
    lora = LoraSettings(r=16, alpha=32, dropout=0.0, adapter_name="sft",
                        **({} if value is None else {variant: value}))
    model = build_model(Backbone(pretrained=None, tiny=TinyConfig(), lora=lora), tokenizer)
    trainable, _ = model.get_nb_trainable_parameters()
    assert counted == trainable
    plain = sum(16 * (m.in_features + m.out_features) for m in _adapted_linears(model).values())
    magnitudes = sum(m.out_features for m in _adapted_linears(model).values())
    assert counted == plain + (magnitudes if variant == "use_dora" else 0)
