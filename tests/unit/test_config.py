"""Config: strict keys with suggestions, typed values, dotted overrides."""

import pytest

from alignkit.config import load_config, parse_override
from alignkit.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "method: sft\ntrain:\n  lr: 1.0e-4\n"),
        ["train.batch_size=2", "lora.enabled=true", "data.column_map={a: prompt}"],
    )
    assert cfg.model.name == "smollm2-135m"
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 2
    assert cfg.lora.enabled and cfg.data.column_map == {"a": "prompt"}


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "train:\n  learning_rat: 1e-4\n"))
    assert "unknown key 'train.learning_rat'" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.bach_size=3"])
    assert "did you mean 'train.batch_size'" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["trian.lr=3"])
    assert "did you mean 'train'" in str(exc.value)


@pytest.mark.parametrize(
    "override, meant",
    [
        ("train.learning_rate=1e-4", "train.lr"),
        ("train.gradient_accumulation_steps=2", "train.grad_accum"),
        ("lora.rank=8", "lora.r"),
        ("lora.lora_alpha=16", "lora.alpha"),
        ("data.max_seq_length=256", "data.max_length"),
    ],
)
def test_unknown_key_suggests_our_name_for_other_tools_names(override, meant):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert f"did you mean '{meant}'" in str(exc.value)


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "train:\n  lr: fast\n"))
    msg = str(exc.value)
    assert "'train.lr'" in msg and "'fast'" in msg and "c.yaml" in msg
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=dpoo"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no '='"):
        parse_override("train.lr")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "lora.target_modules=[q_proj, v_proj]"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_yaml_bare_no_for_mixed_precision(tmp_path):
    assert (
        load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision
        == "no"
    )
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_ppo_resolved_config_has_no_reference_section(tmp_path):
    import yaml

    cfg = load_config(None, ["method=ppo", "ppo.reward_fn=alignkit.rewards:gsm8k_answer"])
    data = yaml.safe_load(cfg.to_yaml())
    assert "reference" not in data and "ppo" in data and "dpo" not in data
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg
    assert "reference" in yaml.safe_load(load_config(None, ["method=dpo"]).to_yaml())
    with pytest.raises(ConfigError, match="starting model"):
        load_config(None, ["method=ppo", "ppo.reward_fn=m:f", "reference.model=other"])


def test_ppo_takes_the_shared_checkpoint_settings():
    cfg = load_config(None, [
        "method=ppo", "ppo.reward_fn=alignkit.rewards:gsm8k_format", "train.save_every=5",
        "train.resume=auto", "train.keep_checkpoints=3",
    ])  # fmt: skip
    assert (cfg.train.save_every, cfg.train.resume, cfg.train.keep_checkpoints) == (5, "auto", 3)


def test_group_by_prompt_is_for_kto():
    assert load_config(None, ["method=kto", "train.group_by_prompt=true"]).train.group_by_prompt
    with pytest.raises(ConfigError, match="group_by_prompt is for kto"):
        load_config(None, ["method=dpo", "train.group_by_prompt=true"])


def test_a_lora_section_means_lora_unless_it_says_otherwise(tmp_path):
    """`lora: {r: 16, alpha: 32}` asks for LoRA: it is enabled, and the run log is told why;
    `enabled: false` keeps full fine-tuning, and no section means full fine-tuning as before."""
    path = tmp_path / "cfg.yaml"
    path.write_text("lora:\n  r: 16\n  alpha: 32\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.lora.enabled and cfg.lora.r == 16
    assert [line for line in cfg.decisions if line.startswith("lora:")] == [
        "lora: the config sets LoRA options (r=16, alpha=32) without `enabled`, so LoRA "
        "adapters are trained (lora.enabled=false trains every parameter instead)"
    ]
    assert "enabled: true" in cfg.to_yaml()  # the resolved config says what ran
    off = load_config(path, ["lora.enabled=false"])
    assert not off.lora.enabled and not any("lora" in line for line in off.decisions)
    assert not load_config(None).lora.enabled
    assert load_config(None, ["lora.r=8"]).lora.enabled  # an override is a section too
    assert load_config(None, ["lora=true"]).lora.enabled


def test_a_model_given_as_a_plain_name(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: smollm2-135m\n", encoding="utf-8")
    assert load_config(path).model.name == "smollm2-135m"
    cfg = load_config(path, ["model.dtype=fp32"])  # overrides still reach the section
    assert (cfg.model.name, cfg.model.dtype) == ("smollm2-135m", "fp32")


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        (["method=sft", "lora.enabled=true"], 2e-4),
        (["method=sft"], 2e-5),
        (["method=dpo", "lora.enabled=true"], 5e-5),
        (["method=dpo"], 5e-7),  # full fine-tuning DPO: two orders below LoRA's rate
        (["method=kto"], 5e-7),
        (["method=reward"], 1e-5),
        (["method=ppo", "ppo.reward_fn=alignkit.rewards:gsm8k_format"], 1e-5),
    ],
)
def test_learning_rate_defaults_follow_the_method_and_lora(overrides, lr):
    cfg = load_config(None, overrides)
    assert cfg.train.lr == pytest.approx(lr)
    assert any(line.startswith("train.lr: not set") for line in cfg.decisions)
    assert cfg.warnings == []


def test_a_learning_rate_far_outside_the_usual_range_warns_with_the_range():
    cfg = load_config(None, ["method=dpo", "train.lr=2e-4"])  # LoRA SFT's rate, full DPO
    assert cfg.train.lr == 2e-4  # kept: a warning, not an error
    assert len(cfg.warnings) == 1
    assert "above the usual range for dpo with full fine-tuning (1e-07 to 1e-05" in cfg.warnings[0]
    quiet = load_config(None, ["method=dpo", "lora.enabled=true", "train.lr=1e-4"])
    assert quiet.warnings == [] and quiet.decisions == []
    low = load_config(None, ["method=sft", "lora.enabled=true", "train.lr=1e-7"])
    assert "below the usual range" in low.warnings[0]
