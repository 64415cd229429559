"""Local DP training: Opacus' step equals the plain step without noise, LoRA really trains under
DP (opacus #820 guard), the spend meets the calibrated target, and bad settings are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedrad.client.training.train import DPConfig, TrainConfig, train_local
from tests.model_fixtures import micro_examples, micro_model


def _fixed_batch(model, n: int = 6):  # type: ignore[no-untyped-def]
    ex = micro_examples(model, n)
    return tuple(torch.stack(col) for col in zip(*(ex[i] for i in range(n)), strict=True))


def _lora_b_nonzero(model) -> None:  # type: ignore[no-untyped-def]
    """LoRA B starts at zero (so A gets no gradient); perturb it so every tensor is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def _step(module, params, batch, optimizer) -> None:  # type: ignore[no-untyped-def]
    optimizer.zero_grad()
    lm, finding, _ = module(*batch)
    (lm + finding).mean().backward()
    optimizer.step()


def test_dp_step_without_noise_or_clipping_equals_plain_step() -> None:
    base = micro_model()
    _lora_b_nonzero(base)
    batch = _fixed_batch(base)
    plain, private = copy.deepcopy(base), copy.deepcopy(base)
    params = [p for p in plain.parameters() if p.requires_grad]
    _step(plain, params, batch, torch.optim.SGD(params, lr=0.1))
    gsm = GradSampleModule(private)
    dp_params = [p for p in private.parameters() if p.requires_grad]
    dp_opt = DPOptimizer(
        torch.optim.SGD(dp_params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        expected_batch_size=batch[0].shape[0],
    )
    _step(gsm, dp_params, batch, dp_opt)
    gsm._close()
    for (name, a), b in zip(
        ((n, p) for n, p in plain.named_parameters() if p.requires_grad), dp_params, strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_every_lora_tensor_moves_after_one_dp_step() -> None:
    model = micro_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert before
    train_local(
        model,
        micro_examples(model, 12),
        TrainConfig(steps=1, batch_size=6, lr=1e-2),
        DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5),
    )
    for name, value in before.items():
        after = dict(model.named_parameters())[name]
        assert not torch.equal(after, value), f"{name} did not move"


def test_dp_lora_update_follows_the_private_free_gradient() -> None:
    """With little noise, the DP LoRA update points where the non-private one does."""
    torch.manual_seed(0)
    base = micro_model()
    _lora_b_nonzero(base)
    batch = _fixed_batch(base, 8)
    deltas = []
    for noise in (None, 0.01):
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        if noise is None:
            module, opt = model, torch.optim.SGD(params, lr=0.05)
        else:
            module = GradSampleModule(model)
            opt = DPOptimizer(
                torch.optim.SGD(params, lr=0.05),
                noise_multiplier=noise,
                max_grad_norm=1.0,
                expected_batch_size=8,
            )
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        before = torch.cat([p.detach().flatten().clone() for p in lora])
        _step(module, params, batch, opt)
        deltas.append(torch.cat([p.detach().flatten() for p in lora]) - before)
    cosine = torch.nn.functional.cosine_similarity(deltas[0], deltas[1], dim=0)
    assert cosine > 0.5, float(cosine)


def test_calibrated_noise_meets_target_epsilon() -> None:
    model = micro_model()
    result = train_local(
        model,
        micro_examples(model, 40),
        TrainConfig(steps=5, batch_size=4),
        DPConfig(target_epsilon=3.0, delta=1e-5),
    )
    assert result.noise_multiplier > 0
    assert result.epsilon is not None and 2.5 < result.epsilon <= 3.0 + 1e-6
    assert result.sample_rate == pytest.approx(0.1)
    assert result.steps == 5


def test_planned_schedule_spends_less_per_call() -> None:
    model = micro_model()
    result = train_local(
        model,
        micro_examples(model, 40),
        TrainConfig(steps=5, batch_size=4),
        DPConfig(target_epsilon=3.0, delta=1e-5, planned_steps=50),
    )
    assert result.epsilon is not None and result.epsilon < 2.0


def test_no_dp_baseline_trains_and_reports_no_epsilon() -> None:
    model = micro_model()
    result = train_local(
        model,
        micro_examples(model, 12),
        TrainConfig(steps=3, batch_size=4),
        DPConfig(enabled=False),
    )
    assert result.epsilon is None and result.noise_multiplier == 0.0
    assert len(result.losses) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_epsilon": None},
        {"target_epsilon": -1.0},
        {"delta": 0.0},
        {"delta": 1.0},
        {"max_grad_norm": 0.0},
        {"noise_multiplier": -0.5},
    ],
)
def test_bad_dp_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DPConfig(**kwargs)


def test_bad_train_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        TrainConfig(steps=0)
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)


def test_a_frozen_encoder_is_untouched_by_dp_training() -> None:
    model = micro_model(freeze_encoder=True)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head = model.head.weight.detach().clone()
    train_local(
        model,
        micro_examples(model, 12),
        TrainConfig(steps=2, batch_size=6, lr=1e-2),
        DPConfig(noise_multiplier=1.0),
    )
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(head, model.head.weight)


def test_poisson_sampling_runs_at_exactly_the_rate_the_ledger_records() -> None:
    """Opacus' own conversion samples at 1 / ceil(N / B); the ledger records B / N."""
    from fedrad.client.training.train import _dp_loader
    from fedrad.common.privacy.randomness import MechanismRandomness

    model = micro_model()
    examples = micro_examples(model, 14)
    loader = _dp_loader(
        examples, TrainConfig(batch_size=4), torch.device("cpu"), 4 / 14, MechanismRandomness()
    )
    assert loader.batch_sampler.sample_rate == pytest.approx(4 / 14)  # Opacus: 1 / 4
    assert len(loader) == TrainConfig().steps  # exactly the steps run, as accounted
    result = train_local(
        model, examples, TrainConfig(steps=2, batch_size=4), DPConfig(noise_multiplier=1.0)
    )
    assert result.sample_rate == pytest.approx(4 / 14)


def test_a_bf16_dp_step_matches_the_float32_plain_step() -> None:
    """The GPU path (bf16 autocast under Opacus' hooks), exercised on the CPU: without noise or
    clipping its update points where the float32 non-private update does."""
    base = micro_model()
    _lora_b_nonzero(base)
    examples = micro_examples(base, 8)
    updates = []
    for precision, dp in (
        ("fp32", DPConfig(enabled=False)),
        ("bf16", DPConfig(noise_multiplier=0.0, max_grad_norm=1e6)),
    ):
        model = copy.deepcopy(base)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_local(
            model,
            examples,
            TrainConfig(steps=1, batch_size=8, lr=1e-2, precision=precision),  # type: ignore[arg-type]
            dp,
        )
        assert all(p.dtype == torch.float32 for p in model.parameters())
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    cosine = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0)
    assert cosine > 0.9, float(cosine)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _moved(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_radiograph_only_site_leaves_the_ct_part_untouched_under_dp() -> None:
    """No noise lands on a part the site's data never reach, and the result says so."""
    model = micro_model(freeze_encoder=True)
    ct_before, xr_before = _snapshot(model.volume_projector), _snapshot(model.projector)
    result = train_local(
        model,
        micro_examples(model, 12),
        TrainConfig(steps=2, batch_size=6, lr=1e-2),
        DPConfig(noise_multiplier=1.0),
    )
    assert result.parts == frozenset({"radiograph"})
    assert not _moved(ct_before, model.volume_projector)
    assert _moved(xr_before, model.projector)
    assert all(p.requires_grad for p in model.volume_projector.parameters())  # restored


def test_a_mixed_site_trains_both_projectors_and_never_the_volume_encoder() -> None:
    model = micro_model(freeze_encoder=True)
    ct_before, xr_before = _snapshot(model.volume_projector), _snapshot(model.projector)
    encoder_before = _snapshot(model.volume_encoder)
    result = train_local(
        model,
        micro_examples(model, 12, ct_every=2),
        TrainConfig(steps=2, batch_size=6, lr=1e-2),
        DPConfig(noise_multiplier=1.0),
    )
    assert result.parts == frozenset({"radiograph", "CT"})
    assert _moved(ct_before, model.volume_projector) and _moved(xr_before, model.projector)
    assert not _moved(encoder_before, model.volume_encoder)


def test_a_ct_only_site_leaves_the_radiograph_part_untouched() -> None:
    model = micro_model(freeze_encoder=True)
    xr_before = _snapshot(model.projector)
    result = train_local(
        model,
        micro_examples(model, 8, ct_every=1),
        TrainConfig(steps=2, batch_size=4, lr=1e-2),
        DPConfig(noise_multiplier=1.0),
    )
    assert result.parts == frozenset({"CT"})
    assert not _moved(xr_before, model.projector)
