"""Report building blocks: markdown tables, PNG plots, report.md."""
from __future__ import annotations

import pytest

from cbd_ray import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_rows_and_blanks_missing_cells():
    rows = [{"method": "cbd", "params": 138_000_000, "acc": 0.51234, "note": "a|b"},
            {"method": "rand", "params": 138_000_000, "acc": 0.25}]
    md = R.markdown_table(rows, ["method", ("params", "parameters"), "acc", "note"])
    lines = md.strip().splitlines()
    assert lines[0] == "| method | parameters | acc | note |"
    assert lines[1] == "|---|---:|---:|---|"
    assert lines[2] == "| cbd | 138,000,000 | 0.5123 | a\\|b |"
    assert lines[3] == "| rand | 138,000,000 | 0.2500 |  |"
    assert R.markdown_table(rows).splitlines()[0] == "| method | params | acc | note |"


def test_plots_and_report_are_written(tmp_path):
    rows = [{"method": m, "params": p, "acc": 0.3 + 0.1 * i + (0.05 if m == "cbd" else 0)}
            for m in ("cbd", "rand") for i, p in enumerate((1e6, 2e6, 4e6))]
    scores = R.plot_scores_by_size(rows, "acc", tmp_path / "plots/acc.png")
    curves = R.plot_curves({"cbd": [(s, 5 / (s + 1)) for s in range(20)],
                            "rand": [(s, 6 / (s + 1)) for s in range(20)]},
                           tmp_path / "plots/loss.png", "step", "loss", logy=True)
    bar = R.plot_bar({"chain": 1.2e6, "direct": 4.8e6}, tmp_path / "plots/tokens.png")
    grouped = R.plot_bar({"138M": {"chain": 1.0, "direct": 3.0}, "220M": {"chain": 1.0, "direct": 4.0}},
                         tmp_path / "plots/tokens_grouped.png")
    for p in (scores, curves, bar, grouped):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    with pytest.raises(ValueError, match="'ppl'"):
        R.plot_scores_by_size(rows, "ppl", tmp_path / "x.png")

    table = R.markdown_table(rows, ["method", "params", "acc"])
    out = R.write_report(tmp_path, [
        R.Section("Scores", table, [scores]),
        {"title": "Convergence", "body": "CBD vs Rand", "images": ["plots/loss.png"]},
        R.Section("Teacher tokens", images=[bar, grouped]),
    ], title="Demo run")
    text = out.read_text()
    assert out == tmp_path / "report.md"
    assert text.startswith("# Demo run\n")
    for link in ("plots/acc.png", "plots/loss.png", "plots/tokens.png", "plots/tokens_grouped.png"):
        assert f"]({link})" in text
    assert table.strip() in text
    assert text.index("## Scores") < text.index("## Convergence") < text.index("## Teacher tokens")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        R.write_report(tmp_path, [R.Section("x", images=["missing.png"])])
