"""The built-in harness agrees with lm-evaluation-harness 0.4.x (the `eval` extra): the same acc and acc_norm on
the same checkpoint for a local multiple-choice task (60 questions, 0- and 2-shot) and a cloze task, the same
per-choice log-likelihoods, and every public format renders its rows into the requests lm-eval's own task YAML
makes of them. Everything is local files: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from eval_helpers import cloze_rows, gpt2_checkpoint, mc_rows, write_jsonl
from phiforge.evaluation import load_for_eval, load_task
from phiforge.evaluation.harness import import_lm_eval, mc_task_yaml, run_lm_eval
from phiforge.evaluation.tasks import encode_task, score_task, task_metrics

lm_eval, TaskManager = import_lm_eval()
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"

LOCAL_CLOZE = """include: {lm_eval}/lambada/lambada_openai.yaml
task: local_cloze
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {path}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    ckpt = gpt2_checkpoint(d / "ckpt")
    (d / "tasks").mkdir()
    mc, cloze = write_jsonl(d / "mc.jsonl", mc_rows(60)), write_jsonl(d / "cloze.jsonl", cloze_rows(30))
    (d / "tasks" / "mc.yaml").write_text(mc_task_yaml("local_mc", mc))
    (d / "tasks" / "cloze.yaml").write_text(LOCAL_CLOZE.format(lm_eval=LM_EVAL_TASKS, path=cloze))
    return d, ckpt


def builtin(ckpt, name: str, path: Path, num_fewshot: int = 0, limit: int | None = None):
    model, tok = load_for_eval(ckpt, device="cpu")
    requests = encode_task(load_task(name, path), tok, model.cfg.max_seq_len, num_fewshot=num_fewshot, limit=limit)
    scores = score_task(model, requests)
    return task_metrics(requests, scores), scores


def assert_same_lls(samples: list[dict], scores) -> None:
    assert len(samples) == len(scores)
    for s in samples:
        theirs = [float(r[0]) for r in s["filtered_resps"]] if isinstance(s["filtered_resps"][0], list) \
            else [float(s["filtered_resps"][0])]
        ours = [ll for ll, _ in scores[s["doc_id"]]]
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_builtin_agrees_with_lm_eval_zero_shot(setup):
    d, ckpt = setup
    (mc, mc_scores), (cloze, cloze_scores) = builtin(ckpt, "mc", d / "mc.jsonl"), builtin(ckpt, "gutenberg-cloze",
                                                                                          d / "cloze.jsonl")
    theirs = run_lm_eval(ckpt, ["local_mc", "local_cloze"], include_path=d / "tasks", log_samples=True)
    assert theirs["results"]["local_mc"]["acc,none"] == mc["acc"]
    assert theirs["results"]["local_mc"]["acc_norm,none"] == mc["acc_norm"]
    assert theirs["results"]["local_cloze"]["acc,none"] == cloze["acc"]
    assert theirs["results"]["local_cloze"]["perplexity,none"] == pytest.approx(cloze["ppl"], rel=1e-4)
    assert 0 < mc["acc"] < 1 and mc["acc"] != mc["acc_norm"]  # the metrics are not trivial
    assert_same_lls(theirs["samples"]["local_mc"], mc_scores)
    assert_same_lls(theirs["samples"]["local_cloze"], cloze_scores)


def test_builtin_agrees_with_lm_eval_two_shot(setup):
    d, ckpt = setup
    ours, scores = builtin(ckpt, "mc", d / "mc.jsonl", num_fewshot=2, limit=20)
    theirs = run_lm_eval(ckpt, ["local_mc"], include_path=d / "tasks", num_fewshot=2, limit=20, log_samples=True)
    assert theirs["results"]["local_mc"]["acc,none"] == ours["acc"]
    assert theirs["results"]["local_mc"]["acc_norm,none"] == ours["acc_norm"]
    assert_same_lls(theirs["samples"]["local_mc"], scores)  # the same demonstrations before each question


# One or two rows of each public task in the layout its Hugging Face release ships (lm-eval's dataset_path), and the
# split lm-eval evaluates.
PUBLIC = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", [
        {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window "
         "of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "endings": [
             ", the man adds wax to the windshield and cuts it.", ", a person board a ski lift.",
             ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow."],
         "label": "3"},
        {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean [title] Get a bucket.", "ctx_b": "",
         "endings": ["[step] Fill it [substeps] up.", "b", "c", "d"], "label": "0"}]),
    "arc_easy": ("arc/arc_easy.yaml", "test", [
        {"id": "1", "question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"],
                                                              "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "2", "question": "2 + 2?", "choices": {"text": ["3", "4"], "label": ["1", "2"]}, "answerKey": "2"}]),
    "piqa": ("piqa/piqa.yaml", "validation", [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Hit the jar.", "label": 0}]),
    "winogrande": ("winogrande/default.yaml", "validation", [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"}]),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", [
        {"id": "7", "question_stem": "The sun is responsible for", "choices": {
            "text": ["puppies learning new tricks", "plants sprouting"], "label": ["A", "B"]}, "answerKey": "B"}]),
    "copa": ("super_glue/copa/default.yaml", "validation", [
        {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
         "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0}]),
    "boolq": ("super_glue/boolq/default.yaml", "validation", [
        {"question": "is the sky blue", "passage": "Sky -- The sky is blue.", "idx": 0, "label": 1}]),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test", [{"text": "she wrote to him and he wrote back to her"}]),
}


@pytest.fixture(scope="module")
def public_requests(tmp_path_factory) -> dict[str, dict[int, list[tuple[str, str]]]]:
    """lm-eval's (context, continuation) requests of each document of each PUBLIC task, built without a model from
    a local YAML that includes lm-eval's own task YAML and points it at the rows (one TaskManager for all)."""
    d = tmp_path_factory.mktemp("public")
    (d / "tasks").mkdir()
    for name, (yaml_file, split, rows) in PUBLIC.items():
        data = write_jsonl(d / f"{name}.jsonl", rows)
        splits = "\n".join(f"{s}_split: {split if s == split else 'null'}" for s in ("training", "validation", "test"))
        (d / "tasks" / f"{name}.yaml").write_text(
            f"include: {LM_EVAL_TASKS / yaml_file}\ntask: {name}_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n{splits}\n")
    tasks = TaskManager(include_path=str(d / "tasks")).load([f"{n}_local" for n in PUBLIC])["tasks"]
    out = {}
    for name in PUBLIC:
        t = tasks[f"{name}_local"]
        t.build_all_requests(limit=None, rank=0, world_size=1)
        out[name] = {}
        for inst in sorted(t.instances, key=lambda i: (i.doc_id, i.idx)):
            out[name].setdefault(inst.doc_id, []).append(tuple(inst.args))
    return d, out


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_formats_render_as_lm_eval(public_requests, name):
    d, theirs = public_requests
    ours = {i: ex.pairs("") for i, ex in enumerate(load_task(name, d / f"{name}.jsonl").examples)}
    assert ours == theirs[name] and ours
def test_harness_errors_are_one_line(capsys, setup):
    d, ckpt = setup
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--harness", "lm-eval", "--tasks", "no_such_task",
                             "--include-path", d / "tasks")
    assert_one_line_error(code, err, "unknown lm-eval task(s): no_such_task")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--harness", "lm-eval", "--text", d / "mc.jsonl")
    assert_one_line_error(code, err, "--harness lm-eval runs --tasks")
