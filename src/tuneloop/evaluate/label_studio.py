"""Label Studio's formats: tasks to import into a project, the labeling config, and its JSON export read back.

Written from Label Studio's documented formats (labelstud.io/guide/task_format, .../export): a task
is {"data": {...}}; the JSON export is a list of tasks, each with `annotations`, each annotation with
`completed_by` (a user id, or an object with id and email) and `result`, a list of regions
{"from_name", "to_name", "type", "value"}: `choices` -> value.choices (a list), `rating` ->
value.rating, `number` -> value.number, `textarea` -> value.text (a list). Cancelled (skipped)
annotations are left out. The JSON-MIN export (one flat object per annotation, data fields and
control names side by side, `annotator` for the rater) is read too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

VALUE_KEYS = {"choices": "choices", "rating": "rating", "number": "number", "textarea": "text",
              "labels": "labels", "taxonomy": "taxonomy"}


def _rater(completed_by: Any) -> str:
    if isinstance(completed_by, dict):
        return str(completed_by.get("email") or completed_by.get("id") or "")
    return "" if completed_by is None else str(completed_by)


def _value(region: dict[str, Any]) -> Any:
    v = region.get("value", {}).get(VALUE_KEYS.get(region.get("type", ""), ""), None)
    if isinstance(v, list) and len(v) == 1:
        return v[0]
    return v


def read_export(path: Path) -> list[dict[str, Any]]:
    """One row per completed annotation: {task_id, data, rater, values: {control name: value}}."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno}); export the project as JSON or JSON-MIN")
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: a Label Studio export is a JSON list of tasks")
    rows = []
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            raise ValueError(f"{path}: item {i} is not a task object")
        if "annotations" not in t and "data" not in t:  # JSON-MIN: data and results flat in one object
            flat = {k: v for k, v in t.items() if k not in ("id", "annotator", "annotation_id", "created_at",
                                                             "updated_at", "lead_time")}
            rows.append({"task_id": t.get("id"), "data": flat, "rater": _rater(t.get("annotator")), "values": flat})
            continue
        for a in t.get("annotations") or []:
            if a.get("was_cancelled"):
                continue
            values = {r["from_name"]: _value(r) for r in a.get("result") or [] if "from_name" in r}
            rows.append({"task_id": t.get("id"), "data": t.get("data") or {}, "rater": _rater(a.get("completed_by")),
                         "values": values})
    return rows


def write_tasks(rows: list[dict[str, Any]], out: Path) -> None:
    """Tasks to import into a project: one {"data": row} per row."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"data": r} for r in rows], indent=1, ensure_ascii=False), encoding="utf-8")


def choices_config(labels: list[str], name: str = "label") -> str:
    """A labeling config for an audit: the prompt and the model's answer shown, one true label chosen."""
    choices = "\n".join(f"    <Choice value={quoteattr(lab)}/>" for lab in labels)
    return ("<View>\n  <Header value=\"$slice: $request_id\"/>\n  <Text name=\"prompt\" value=\"$prompt\"/>\n"
            "  <Header value=\"The model answered: $answer\"/>\n"
            f"  <Choices name=\"{name}\" toName=\"prompt\" choice=\"single\" required=\"true\">\n{choices}\n"
            "  </Choices>\n</View>\n")


def rating_config(dimensions: tuple[str, ...], scale: int = 5) -> str:
    """A labeling config for the review rubric: prompt, answer and reference shown, a rating per dimension."""
    ratings = "\n".join(f"  <Header value={quoteattr(d)}/>\n  <Rating name={quoteattr(d)} toName=\"answer\" "
                        f"maxRating=\"{scale}\" required=\"true\"/>" for d in dimensions)
    return ("<View>\n  <Text name=\"prompt\" value=\"$prompt\"/>\n  <Text name=\"answer\" value=\"$answer\"/>\n"
            f"  <Text name=\"reference\" value=\"$reference\"/>\n{ratings}\n</View>\n")
