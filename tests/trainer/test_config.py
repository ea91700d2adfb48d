"""TrainConfig's per-field resume rules: every field has one, and they decide what --resume refuses and warns about."""

from __future__ import annotations

import dataclasses

from apr_trainer.config import OnResume, TrainConfig, resume_drift


def test_every_field_states_its_resume_rule():
    rules = {f.name: f.metadata["on_resume"] for f in dataclasses.fields(TrainConfig)}
    assert all(isinstance(rule, OnResume) for rule in rules.values())
    assert [name for name, rule in rules.items() if rule is OnResume.FIXED] == ["init", "arch", "arch_config"]


def test_drift_warns_for_warn_fields_only(tmp_path):
    saved = TrainConfig(data=str(tmp_path / "t.bin"), out_dir=str(tmp_path / "run"))
    scalars = {"config": dataclasses.asdict(saved)}
    changed = dataclasses.replace(saved, lr=1e-3, log_every=1, device="cpu")
    warnings = resume_drift(scalars, changed, 0)
    assert warnings == ["warning: --lr changed from 0.0003 to 0.001 since the checkpoint"]
