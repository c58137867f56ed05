"""A clone of the repository is all a user has.

The project's own CI machine keeps a folder of data beside the checkout; a user's clone has none.
No file of the product, its tests, its scripts or its CI may read it: everything the project
needs (Spec-Bench's questions) ships inside the package.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import specprobe
from specprobe.bench import load_questions
from specprobe.bench.questions import packaged_questions

ROOT = Path(__file__).resolve().parents[1]
BESIDE = "shared"  # the folder's name, spelled once so that this file does not match itself
NEEDLES = ("../" + BESIDE, '"' + BESIDE + '" /', "/ '" + BESIDE + "'", BESIDE + "/data/")


def project_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    names = listed.stdout.splitlines() if listed.returncode == 0 else [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    keep = ("specprobe/", "tests/", "scripts/", ".ci/", "pyproject.toml", "README.md", "docs/")
    return [ROOT / n for n in names if n.startswith(keep) and not n.endswith((".png", ".jsonl")) and (ROOT / n).is_file()]


def test_no_file_reads_the_folder_beside_the_checkout():
    offenders = []
    for path in project_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in NEEDLES if needle in text]
    assert not offenders, offenders


def test_spec_bench_questions_ship_with_the_package():
    path = packaged_questions()
    assert path.is_file() and Path(specprobe.__file__).parent in path.parents
    assert (path.parent / "LICENSE").read_text().startswith("Apache License") or "Apache License" in (path.parent / "LICENSE").read_text()
    assert "hemingkx/Spec-Bench" in (path.parent / "SOURCE.md").read_text()
    questions = load_questions()  # the default: the packaged set, read offline
    assert len(questions) == 480 and len({q["category"] for q in questions}) == 13


def test_tests_do_not_read_the_users_tuned_settings():
    from specprobe.store import cache_root
    from specprobe.tuned import settings_root

    assert cache_root() not in settings_root().parents  # conftest gives the session a folder of its own
