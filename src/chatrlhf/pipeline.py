"""`chatrlhf pipeline`: every stage from one config, InstructGPT's loop.

    chatrlhf pipeline --config pipeline.yaml            # then, with human labelers, after ranking:
    chatrlhf pipeline --config pipeline.yaml --resume

SFT -> sample K answers per prompt -> rank (simulated labelers, or people in `chatrlhf label serve`) ->
reward model on every ranking so far -> PPO, then (sample from the new policy -> rank -> RM -> PPO) for each
further iteration, then `eval` of the final policy against the SFT model on held-out prompts, and
`report.md`. The stage sections of the config (`sft`, `reward`, `ppo`) are the stages' own configs; the
pipeline sets their model, data files, output_dir and seed.

Each finished stage is recorded in `pipeline.json`; `--resume` skips those and lets an interrupted training
stage continue from its last checkpoint. With `labeler: human` the run stops after sampling and says how to
open the ranking app.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from operator import attrgetter
from pathlib import Path

from rich.console import Console

from chatrlhf.configs import PipelineConfig, save_config
from chatrlhf.errors import UserError
from chatrlhf.runs import PipelineRun, atomic_write_jsonl, atomic_write_text


class Pipeline:
    """A pipeline run: its folder (`runs.PipelineRun`) and which stages are done (`pipeline.json`)."""

    def __init__(self, cfg: PipelineConfig, console: Console):
        self.cfg, self.console = cfg, console
        self.paths = PipelineRun(cfg.output_dir)
        self.out = self.paths.root
        self.state_path = self.paths.state
        self.db = cfg.db or str(self.paths.db)

    def open(self) -> None:
        cfg = self.cfg
        if self.state_path.exists() and not cfg.resume:
            if not cfg.overwrite:
                raise UserError(
                    f"pipeline: {self.out} holds an earlier run; continue it with --resume true, "
                    "or start again with --overwrite true"
                )
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.state_path.exists():
            self._write({"stages": {}})
        save_config(cfg, self.paths.config)

    @property
    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def done(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def finish(self, stage: str, record: dict) -> dict:
        state = self.state
        state["stages"][stage] = record
        self._write(state)
        return record

    def _write(self, state: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=2) + "\n")

    def stage(self, name: str, run) -> dict:
        """Run a stage unless an earlier run of this folder finished it; its record either way."""
        record = self.done(name)
        if record is not None:
            self.console.print(f"[dim]{name}: finished earlier, skipped")
            return record
        self.console.rule(f"[bold]{name}")
        began = time.perf_counter()
        record = run()
        return self.finish(name, {**record, "seconds": round(time.perf_counter() - began, 1)})


def _stage_cfg(section, pipe: Pipeline, **fields):
    """A stage's config from its pipeline section, with what the pipeline decides filled in; a stage whose
    output folder holds checkpoints from an interrupted run resumes from them."""
    out = Path(fields["output_dir"])
    resume = pipe.cfg.resume and (out / "checkpoints").is_dir()
    return replace(section, seed=pipe.cfg.seed, resume=resume, overwrite=not resume, **fields)


def check_config(cfg: PipelineConfig) -> None:
    for name in ("demonstrations", "prompts", "eval_prompts"):
        if not getattr(cfg, name):
            raise UserError(f"pipeline: say which file holds the {name.replace('_', ' ')}: --{name} FILE")
        if not Path(getattr(cfg, name)).exists():
            raise UserError(f"pipeline: --{name}: no such file: {getattr(cfg, name)}")
    if cfg.ranking_tasks:
        from chatrlhf.sample import read_tasks

        read_tasks(cfg.ranking_tasks, {})  # a bad file stops here, before anything is trained
    if cfg.iterations < 1:
        raise UserError("pipeline: --iterations must be at least 1")
    if cfg.ppo.reward == "judge":
        raise UserError(
            "pipeline: `ppo.reward: judge` would leave the rankings' reward model unused; run "
            "`chatrlhf ppo --reward judge` on its own (`chatrlhf demo --compare true` shows both on the demo)"
        )
    _check_sections(cfg)
    if cfg.label.noise < 0 or cfg.label.tie_margin < 0:
        raise UserError("pipeline: label.noise and label.tie_margin must be 0 or more")


# keys of the stage sections that the pipeline fills in itself: a value given for one would never be read
FILLED_IN = {
    "sample": ("prompts", "db", "model", "seed"),
    "label": ("db",),
    "sft": ("model", "output_dir", "data.train", "seed", "resume", "overwrite"),
    "reward": ("model", "output_dir", "data.train", "seed", "resume", "overwrite"),
    "ppo": (
        "model", "reference_model", "reward_model", "output_dir", "data.train", "seed", "resume", "overwrite",
    ),
    "dpo": ("model", "reference_model", "output_dir", "data.train", "seed", "resume", "overwrite"),
    "eval": ("policy", "baseline", "prompts", "output", "seed"),
}  # fmt: skip


def _check_sections(cfg: PipelineConfig) -> None:
    for section, keys in FILLED_IN.items():
        given = getattr(cfg, section)
        default = type(given)()
        for key in keys:
            if attrgetter(key)(given) != attrgetter(key)(default):
                top = {"model": "model", "data.train": "demonstrations/prompts", "seed": "seed"}.get(key)
                raise UserError(
                    f"pipeline: `{section}.{key}` is set by the pipeline itself"
                    + (f" (from its `{top}`)" if top else "")
                    + "; leave it out of the section"
                )


def _sample(pipe: Pipeline, policy: str, iteration: int) -> dict:
    from chatrlhf.data import load_prompts
    from chatrlhf.labeling.store import Store
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device
    from chatrlhf.sample import read_tasks, sample_tasks

    cfg = replace(pipe.cfg.sample, seed=pipe.cfg.seed * 1009 + iteration)
    store = Store(pipe.db)
    earlier = store.task_ids(iteration=iteration)
    if earlier:  # a run stopped after adding them, before recording the stage: never add them twice
        pipe.console.print(
            f"{len(earlier)} ranking tasks of iteration {iteration} already in {pipe.db}; kept"
        )
        return {"tasks": len(earlier), "first_task": min(earlier), "model": policy}
    conversations = load_prompts(pipe.cfg.prompts)
    tokenizer = load_tokenizer(policy)
    model = load_causal_lm(policy, tokenizer, pick_device())
    tasks = []
    for batch, _, _ in sample_tasks(model, tokenizer, conversations, cfg, policy, {"iteration": iteration}):
        tasks += batch
    if iteration == 1 and pipe.cfg.ranking_tasks:
        tasks += read_tasks(pipe.cfg.ranking_tasks, {"iteration": 1, "source": pipe.cfg.ranking_tasks})
    ids = store.add_tasks(tasks)  # all at once: a rerun after an interruption never holds half an iteration
    pipe.console.print(f"{len(ids)} ranking tasks of up to {cfg.k} answers from {policy}")
    return {"tasks": len(ids), "first_task": min(ids, default=0), "model": policy}


def _label(pipe: Pipeline, iteration: int, sampled: dict) -> dict | None:
    """Rankings of this iteration's tasks; None while people have not ranked enough of them."""
    from chatrlhf.judges import make_judge
    from chatrlhf.labeling.auto import label
    from chatrlhf.labeling.store import Store

    store = Store(pipe.db)
    if pipe.cfg.labeler == "auto":
        lc = pipe.cfg.label
        judge = make_judge(lc.judge, lc.judge_model, lc.llm_base_url, lc.llm_api_key)
        label(store, judge, lc.noise, lc.labelers, lc.seed * 1009 + pipe.cfg.seed, lc.tie_margin)
    ranked = [r for r in store.rankings() if r["meta"].get("iteration") == iteration]
    needed = pipe.cfg.min_rankings or sampled["tasks"]
    if pipe.cfg.labeler == "human" and len(ranked) < needed:
        return None
    agreement = store.progress().get("agreement")
    pipe.console.print(f"{len(ranked)} tasks ranked; agreement between labelers: {agreement}")
    return {"ranked": len(ranked), "agreement": agreement}


def _wait_for_people(pipe: Pipeline, iteration: int) -> None:
    cfg, c = pipe.cfg, pipe.console
    c.rule("[bold yellow]waiting for rankings")
    c.print(f"iteration {iteration}: the sampled answers wait for people to rank them in {pipe.db}.")
    c.print(f"  add a labeler:    chatrlhf label labeler add NAME --db {pipe.db}")
    c.print(f"  open the app:     chatrlhf label serve --db {pipe.db}   (then the page it prints)")
    c.print(f"  then continue:    chatrlhf pipeline --config ... --output_dir {cfg.output_dir} --resume true")


def _export_rankings(pipe: Pipeline, iteration: int) -> str:
    from chatrlhf.labeling.store import Store

    records = Store(pipe.db).rankings()
    path = pipe.paths.rankings(iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, records)
    if len(records) < 2:
        raise UserError(
            f"pipeline: only {len(records)} ranked tasks in {pipe.db}; the reward model needs more"
        )
    return str(path)


def _gold_fn(pipe: Pipeline):
    """The simulated labeler's judge without its noise, logged beside the proxy reward during PPO."""
    from chatrlhf.judges import make_judge

    lc = pipe.cfg.label
    if pipe.cfg.labeler != "auto" or lc.judge in ("rm", "llm"):
        return None  # people have no score function; model judges would double PPO's cost
    judge = make_judge(lc.judge, lc.judge_model, lc.llm_base_url, lc.llm_api_key)
    return lambda convs, texts, metas: [
        judge.scores(c, [t], meta)[0] for c, t, meta in zip(convs, texts, metas)
    ]


def run(cfg: PipelineConfig) -> dict:
    from chatrlhf.eval import evaluate, read_result, write_result
    from chatrlhf.report import write_report

    check_config(cfg)
    console = Console()
    pipe = Pipeline(cfg, console)
    pipe.open()
    paths = pipe.paths
    policy, waiting = _train_policy(pipe)
    if waiting:
        return {"waiting": waiting}
    eval_cfg = replace(
        cfg.eval,
        policy=policy,
        baseline=str(paths.sft),
        base=cfg.eval.base or cfg.model or "default",
        prompts=cfg.eval_prompts,
        judge=cfg.eval.judge or cfg.label.judge,
        reward_model=cfg.eval.reward_model
        or ("" if cfg.optimizer == "dpo" else str(paths.rm(cfg.iterations))),
        output=str(paths.eval),
        seed=cfg.seed,
    )
    result = None

    def run_eval():
        nonlocal result
        result = evaluate(eval_cfg)
        write_result(result, eval_cfg, paths.eval)
        return {k: v for k, v in asdict(result).items() if k != "rows"}

    figures = pipe.stage("eval", run_eval)
    report = write_report(paths, cfg, pipe.state, result or read_result(paths.eval), eval_cfg)
    console.print(f"report: {report}")
    console.print(f"chat with the result:  chatrlhf chat {policy}")
    return {"report": str(report), "policy": policy, "eval": figures}


def _train_policy(pipe: Pipeline) -> tuple[str, str]:
    """SFT, then each iteration's sample -> rank -> reward model -> PPO. Returns the final policy's folder
    and "", or the stage that waits for people to rank an iteration's answers."""
    from chatrlhf import sft

    cfg, paths = pipe.cfg, pipe.paths
    sft_path = str(paths.sft)
    sft_cfg = _stage_cfg(
        cfg.sft,
        pipe,
        model=cfg.model,
        output_dir=sft_path,
        data=replace(cfg.sft.data, train=cfg.demonstrations),
    )
    pipe.stage("sft", lambda: sft.train(sft_cfg))
    policy = sft_path
    for it in range(1, cfg.iterations + 1):
        sampled = pipe.stage(f"iter{it}/sample", lambda p=policy, i=it: _sample(pipe, p, i))
        if pipe.done(f"iter{it}/label") is None:
            pipe.console.rule(f"[bold]iter{it}/label")
            labelled = _label(pipe, it, sampled)
            if labelled is None:
                _wait_for_people(pipe, it)
                return policy, f"iter{it}/label"
            pipe.finish(f"iter{it}/label", labelled)
        policy = _improve(pipe, it, policy, sft_path)
    return policy, ""


def _improve(pipe: Pipeline, it: int, policy: str, sft_path: str) -> str:
    """One iteration's optimiser on the rankings so far, from `policy` with the SFT model as the reference:
    a reward model and then PPO (or its loop with GRPO / RLOO advantages), or DPO straight from the rankings.
    Returns the new policy's folder."""
    from chatrlhf import dpo, ppo, reward

    cfg, paths = pipe.cfg, pipe.paths
    if cfg.optimizer == "dpo":

        def train_dpo():
            data = replace(cfg.dpo.data, train=_export_rankings(pipe, it))
            out = str(paths.dpo(it))
            return dpo.train(
                _stage_cfg(cfg.dpo, pipe, model=policy, reference_model=sft_path, output_dir=out, data=data)
            )

        pipe.stage(f"iter{it}/dpo", train_dpo)
        return str(paths.dpo(it))
    rm_path = str(paths.rm(it))

    def train_rm():
        data = replace(cfg.reward.data, train=_export_rankings(pipe, it))
        return reward.train(_stage_cfg(cfg.reward, pipe, model=sft_path, output_dir=rm_path, data=data))

    pipe.stage(f"iter{it}/rm", train_rm)
    group = {}
    if cfg.optimizer in ("grpo", "rloo"):  # the answers to a prompt are each other's baseline
        group = {
            "advantage_estimator": cfg.optimizer,
            "samples_per_prompt": max(cfg.ppo.samples_per_prompt, 4),
        }
    ppo_cfg = _stage_cfg(
        cfg.ppo,
        pipe,
        model=policy,
        reference_model=sft_path,
        reward_model=rm_path,
        output_dir=str(paths.ppo(it)),
        data=replace(cfg.ppo.data, train=cfg.prompts),
        **group,
    )
    pipe.stage(f"iter{it}/ppo", lambda: ppo.train(ppo_cfg, gold_fn=_gold_fn(pipe)))
    return str(paths.ppo(it))
