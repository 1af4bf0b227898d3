"""covidct train / pretrain flags come from the config dataclasses: every field, its help, choices and default."""
from dataclasses import asdict, fields

import pytest

from covidct.cli import build_parser, run_config_from_args
from covidct.options import flag_name
from covidct.pretrain import PretrainConfig
from covidct.train import TrainConfig


def subcommand(parser, name):
    return next(action for action in parser._subparsers._group_actions[0].choices.items() if action[0] == name)[1]


@pytest.mark.parametrize("command, config_class", [("train", TrainConfig), ("pretrain", PretrainConfig)])
def test_every_config_field_is_a_flag_with_its_help_and_choices(command, config_class):
    actions = {action.dest: action for action in subcommand(build_parser(), command)._actions}
    for config_field in fields(config_class):
        action = actions[config_field.name]
        assert flag_name(config_field.name, config_field.default) in action.option_strings
        assert config_field.metadata["help"] and config_field.metadata["help"] in action.help
        assert action.choices == config_field.metadata["choices"]
        assert action.default is None                     # "not typed": the dataclass default applies


@pytest.mark.parametrize("command, config_class", [("train", TrainConfig), ("pretrain", PretrainConfig)])
def test_untyped_options_take_the_dataclass_defaults(command, config_class, tmp_path):
    args = build_parser().parse_args([command, "--data", str(tmp_path)])
    config = run_config_from_args(config_class, args)
    expected = asdict(config_class())
    for name in ("data", "out", "cache_dir"):                # the command fills these in
        expected.pop(name)
    assert {k: v for k, v in asdict(config).items() if k in expected} == expected
    assert config.data == str(tmp_path) and config.cache_dir and tmp_path.name in config.out


def test_schedule_flags_reach_the_pretrain_config(tmp_path):
    args = build_parser().parse_args(["pretrain", "--data", str(tmp_path), "--schedule", "step", "--step-epochs", "3",
                                      "--warmup-epochs", "0", "--skip-bad", "--no-progress", "--val-split", ""])
    config = run_config_from_args(PretrainConfig, args)
    assert (config.schedule, config.step_epochs, config.warmup_epochs) == ("step", 3, 0)
    assert config.skip_bad is True and config.progress is False and config.val_split == ""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--schedule", "linear"])     # choices come from the field


@pytest.mark.parametrize("command, target", [("train", "covidct.train.train"), ("pretrain", "covidct.pretrain.pretrain")])
def test_ctrl_c_says_how_to_continue(command, target, tmp_path, monkeypatch, capsys):
    from covidct.cli import main

    def interrupted(config, resume=False, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    assert main([command, "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 130
    assert f"continue with: covidct {command} --resume {tmp_path / 'run'}" in capsys.readouterr().err
