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
