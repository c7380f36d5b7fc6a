"""`cbd evaluate --backend lm-eval`: lm-evaluation-harness's own scoring on any produced model.

The harness's Hub task configs download their datasets; for offline use this module writes
task YAMLs in lm-eval's own format for the local files of a data folder laid out like
``../shared/data`` (found as :func:`cbd_ray.tasks.find_task_data` finds them): ``cbd_boolq``,
``cbd_arc_easy``, ``cbd_hellaswag``, ``cbd_winogrande`` and the group ``cbd_mmlu`` (one task
per subject CSV, zero-shot). Prompts, choices and targets are those of lm-eval's ``boolq``
(super_glue), ``arc_easy``, ``hellaswag``, ``winogrande`` and ``mmlu`` configs, on the local schemas (each folder's SOURCE.md); HellaSwag's cleaning and
WinoGrande's partial scoring are lm-eval's own functions, imported from the harness.
Needs the optional extra ``cbd-ray[lm-eval]``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from cbd_ray.errors import CBDError

log = logging.getLogger(__name__)

_METRICS = ["acc", "acc_norm", "acc_bytes"]

#: task -> lm-eval YAML fields (besides task, dataset and metrics) on the local schema
LOCAL_TASKS: dict[str, dict[str, Any]] = {
    "boolq": {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
              "doc_to_target": "{{ 1 if answer else 0 }}", "doc_to_choice": ["no", "yes"]},
    "arc_easy": {"doc_to_text": "{{query}}\nAnswer:", "doc_to_target": "{{gold}}", "doc_to_choice": "{{choices}}"},
    "hellaswag": {"process_docs": "!function cbd_lm_eval_utils.hellaswag_docs", "doc_to_text": "{{query}}",
                  "doc_to_target": "{{label}}", "doc_to_choice": "choices"},
    "winogrande": {"doc_to_text": "!function cbd_lm_eval_utils.winogrande_text",
                   "doc_to_target": "!function cbd_lm_eval_utils.winogrande_target",
                   "doc_to_choice": "!function cbd_lm_eval_utils.winogrande_choice"},
    # one task per subject (lm-eval's mmlu_<subject>, zero-shot) under the group cbd_mmlu
    "mmlu": {"doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
             "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer.strip())}}"},
}

_UTILS = '''"""Written by cbd_ray.lm_eval_backend: lm-eval's own HellaSwag and WinoGrande functions on
the local schemas of ../shared/data (HellaSwag's ctx is ctx_a + " " + ctx_b already)."""
from lm_eval.tasks.hellaswag.utils import preprocess
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_choice
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_target


def winogrande_text(doc):
    return {"1": 0, "2": 1}[str(doc["answer"])]


def hellaswag_docs(dataset):
    def one(doc):
        return {"query": preprocess(doc["activity_label"] + ": " + doc["ctx"]),
                "choices": [preprocess(e) for e in doc["endings"]], "label": int(doc["label"])}

    return dataset.map(one)
'''


def _yaml_value(v: Any) -> str:
    import json

    if isinstance(v, str) and v.startswith("!function "):
        return v  # a YAML tag lm-eval resolves, not a string
    return json.dumps(v)  # JSON is YAML: quotes and escapes stay exact


def write_task_configs(out_dir: str | os.PathLike, data_dir: str | os.PathLike, tasks: list[str]) -> list[str]:
    """Write one lm-eval task YAML per task into ``out_dir``; returns the lm-eval task names."""
    from cbd_ray.tasks import TASKS, find_task_data

    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown:
        raise CBDError(f"--backend lm-eval: no local task file for {', '.join(unknown)}; "
                       f"available: {', '.join(LOCAL_TASKS)}")
    out = Path(out_dir)
    (out / "cbd_lm_eval_utils.py").write_text(_UTILS)
    names = []
    for t in tasks:
        src = find_task_data(TASKS[t], data_dir).resolve()
        if t == "mmlu":
            _write_mmlu(out, src)
        else:
            _write_yaml(out / f"cbd_{t}.yaml", {"task": f"cbd_{t}", **_dataset("json", src), **LOCAL_TASKS[t],
                                                "metric_list": _metric_list(TASKS[t].metrics)})
        names.append(f"cbd_{t}")
    return names


def _metric_list(metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in _METRICS if m in metrics]


def _dataset(kind: str, path: Path, **kw: Any) -> dict[str, Any]:
    return {"dataset_path": kind, "dataset_kwargs": {"data_files": {"test": str(path)}, **kw},
            "output_type": "multiple_choice", "test_split": "test"}


def _write_yaml(path: Path, fields: dict[str, Any]) -> None:
    path.write_text("".join(f"{k}: {_yaml_value(v)}\n" for k, v in fields.items()))


def _write_mmlu(out: Path, folder: Path) -> None:
    """One lm-eval task per ``test/<subject>_test.csv`` (no header) and the group cbd_mmlu."""
    subjects = sorted(p.name.removesuffix("_test.csv") for p in (folder / "test").glob("*_test.csv"))
    for s in subjects:
        csv_kw = {"column_names": ["question", "A", "B", "C", "D", "answer"]}
        _write_yaml(out / f"cbd_mmlu_{s}.yaml", {
            "task": f"cbd_mmlu_{s}", **_dataset("csv", folder / "test" / f"{s}_test.csv", **csv_kw),
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{s.replace('_', ' ')}.\n\n", **LOCAL_TASKS["mmlu"], "metric_list": _metric_list(("acc",))})
    _write_yaml(out / "cbd_mmlu.yaml", {"group": "cbd_mmlu", "task": [f"cbd_mmlu_{s}" for s in subjects],
                                        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]})


def evaluate_lm_eval(model_dir: str | os.PathLike, tasks: list[str], data_dir: str | os.PathLike,
                     limit: int | None = None, batch_size: int = 16, device: str = "cpu") -> list[dict[str, Any]]:
    """Score ``model_dir`` with lm-eval (HFLM) on the local task files; one dict per task
    shaped like the native backend's: {"task", "metrics", "n", "model", "backend"}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise CBDError("--backend lm-eval needs lm-evaluation-harness: pip install 'cbd-ray[lm-eval]'") from exc
    with tempfile.TemporaryDirectory(prefix="cbd_lm_eval_") as tmp:
        names = write_task_configs(tmp, data_dir, tasks)
        lm = HFLM(pretrained=str(model_dir), device=device, batch_size=batch_size, dtype="float32",
                  trust_remote_code=False)
        res = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=tmp), limit=limit,
                              num_fewshot=0, log_samples=False, bootstrap_iters=0)
    out = []
    for t, name in zip(tasks, names):
        r = res["results"][name]
        metrics = {k.split(",")[0]: v for k, v in r.items()
                   if "," in k and isinstance(v, (int, float)) and not k.startswith("alias")}
        parts = [k for k in res["n-samples"] if k == name or k.startswith(name + "_")]
        out.append({"task": t, "metrics": metrics, "n": sum(int(res["n-samples"][k]["effective"]) for k in parts),
                    "model": str(model_dir), "backend": "lm-eval"})
        log.info("lm-eval %s: %s", t, metrics)
    return out
