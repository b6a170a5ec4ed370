"""The service policy: documented defaults, durations, and errors that name the field."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from scanflow.spec import SpecError, load_application
from scanflow.spec import policy as policy_module
from scanflow.spec.loader import parse_application
from scanflow.spec.policy import Policy


def _app(policy: object) -> dict:
    return {"app": "a", "team": "t", "services": {"svc": {"model": "m", "policy": policy}}}


def _error(policy: object) -> str:
    with pytest.raises(SpecError) as exc:
        parse_application(_app(policy), file="scanflow.yaml", check_imports=False)
    return str(exc.value)


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    out = [model]
    for f in model.model_fields.values():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += _models(f.annotation)
    return out


def test_every_knob_has_a_default_and_a_description() -> None:
    for model in _models(Policy):
        for name, field in model.model_fields.items():
            assert not field.is_required(), f"{model.__name__}.{name} has no default"
            sub = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            assert sub or field.description, f"{model.__name__}.{name} has no description"
    assert len([f for m in _models(Policy) for f in m.model_fields]) >= 30


def test_a_service_without_policy_gets_the_defaults() -> None:
    app = parse_application({"app": "a", "team": "t", "services": {"svc": {"model": "m"}}},
                            check_imports=False)
    pol = app.services["svc"].policy
    assert pol == Policy()
    assert pol.objectives.accuracy_floor == 0.9 and pol.limits.max_replicas == 4
    assert pol.hysteresis.scale_down_latency_ratio < pol.hysteresis.scale_up_latency_ratio


def test_the_documented_example_loads(tmp_path: Path) -> None:
    block = re.search(r"```yaml\n(.*?)```", policy_module.__doc__ or "", re.S)
    assert block is not None
    spec = {"app": "a", "team": "t", **yaml.safe_load(block.group(1))}
    (tmp_path / "scanflow.yaml").write_text(yaml.safe_dump(spec))
    pol = load_application(tmp_path, check_imports=False).services["mnist"].policy
    assert pol.cooldowns.scale_down == 300 and pol.rollback.within == 3600
    assert pol.promotion.max_loss_on_clean == 0.02 and pol.promotion.alpha == 0.05


def test_promotion_gate_keeps_the_old_knob_names() -> None:
    """Specs written for the fixed-margin gate still validate: the old tolerance name is the new
    one's, and giving both is refused by name."""
    old = Policy.model_validate({"promotion": {"min_gain_on_new": 0.0, "max_loss_on_holdout": 0.01,
                                               "min_labelled": 300}})
    assert old.promotion.max_loss_on_clean == 0.01 == old.promotion.max_loss_on_holdout
    assert old.promotion.min_labelled == 300
    with pytest.raises(ValueError, match="max_loss_on_clean only"):
        Policy.model_validate({"promotion": {"max_loss_on_holdout": 0.01, "max_loss_on_clean": 0.02}})


def test_durations_and_zero_cooldowns(tmp_path: Path) -> None:
    (tmp_path / "scanflow.yaml").write_text(textwrap.dedent("""
        app: a
        team: t
        services:
          svc:
            model: m
            policy:
              cooldowns: {scale_up: 500ms, scale_down: 2m, retrain: 0, rollback: "0s"}
              limits: {retrain_timeout: 1h}
              rollback: {within: 90}
    """))
    pol = load_application(tmp_path, check_imports=False).services["svc"].policy
    assert pol.cooldowns.model_dump() == {"scale_up": 0.5, "scale_down": 120.0, "retrain": 0.0,
                                          "rollback": 0.0}
    assert pol.limits.retrain_timeout == 3600 and pol.rollback.within == 90


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"limits": {"min_replicas": 5, "max_replicas": 2}},
         "services.svc.policy.limits: min_replicas (5) must not exceed max_replicas (2)"),
        ({"hysteresis": {"scale_up_latency_ratio": 0.8, "scale_down_latency_ratio": 0.9}},
         "services.svc.policy.hysteresis: scale_down_latency_ratio (0.9) must be below"),
        ({"cooldowns": {"scale_upp": 3}}, "services.svc.policy.cooldowns.scale_upp: unknown key"),
        ({"cooldowns": {"retrain": "soon"}}, "policy.cooldowns.retrain: cannot read 'soon' as a duration"),
        ({"cooldowns": {"retrain": -5}}, "policy.cooldowns.retrain: a duration must be positive"),
        ({"objectives": {"accuracy_floor": 1.5}}, "policy.objectives.accuracy_floor: Input should be less"),
        ({"objectives": {"p95_latency_ms": 0}}, "policy.objectives.p95_latency_ms: Input should be greater"),
        ({"rollback": {"window": 100, "min_labelled": 200}},
         "min_labelled (200) must not exceed window (100)"),
        ({"promotion": {"min_labelled": "many"}}, "policy.promotion.min_labelled: Input should be a valid"),
        ({"retrain_on_drift": True}, "services.svc.policy.retrain_on_drift: unknown key"),
        ("strict", "services.svc.policy: Input should be a valid dictionary"),
    ],
)
def test_bad_policy_is_refused_naming_the_field(policy: object, message: str) -> None:
    err = _error(policy)
    assert err.startswith("scanflow.yaml: ") or "scanflow.yaml: " in err
    assert message in err, err


def test_policy_is_part_of_the_json_schema() -> None:
    from scanflow.spec import Application

    schema = Application.model_json_schema()
    pol = schema["$defs"]["Policy"]
    assert set(pol["properties"]) >= {"objectives", "limits", "cooldowns", "hysteresis", "promotion",
                                      "rollback"}
    assert "Hysteresis" in schema["$defs"]
    assert "95th percentile" in schema["$defs"]["Objectives"]["properties"]["p95_latency_ms"]["description"]
