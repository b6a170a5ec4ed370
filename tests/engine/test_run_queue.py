"""Two run queues on one store (two servers, or a server and `engine serve`): each queued run
is taken by one of them and runs once. A real local engine, SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

from scanflow.engine import LocalEngine
from scanflow.settings import Settings
from scanflow.spec import load_application
from scanflow.store import Store
from support.waiting import wait_for

SPEC = """
app: queue
team: {team}
workflows:
  note:
    steps:
      - {{name: write, run: "python note.py", params: {{tag: x}}, cache: false}}
"""


def test_two_queues_on_one_store_run_each_queued_run_once(
    settings: Settings, store: Store, tmp_path: Path,
) -> None:
    apps = []
    for team in ("a", "b"):
        d = tmp_path / team
        d.mkdir()
        (d / "scanflow.yaml").write_text(SPEC.format(team=team))
        (d / "note.py").write_text(f"import sys\nopen({str(tmp_path / 'ran.txt')!r}, 'a')"
                                   ".write(sys.argv[2] + '\\n')\n")  # argv: --tag <tag>
        apps.append(load_application(d))
    first = LocalEngine(settings, store)
    ids = [first.submit(apps[i % 2], "note", {"write.tag": f"r{i}"}) for i in range(12)]
    stop = threading.Event()
    queues = [threading.Thread(target=LocalEngine(settings, Store(store.url)).serve,
                               args=(stop.is_set,), kwargs={"max_runs": 2, "poll": 0.05})
              for _ in range(2)]
    for q in queues:
        q.start()
    try:
        wait_for(lambda: all(store.get_run(i).status in ("succeeded", "failed") for i in ids),  # type: ignore[union-attr]
                 180, what="every queued run ended")
    finally:
        stop.set()
        for q in queues:
            q.join(60)
    assert [store.get_run(i).status for i in ids] == ["succeeded"] * 12  # type: ignore[union-attr]
    ran = (tmp_path / "ran.txt").read_text().split()
    assert sorted(ran) == sorted(f"r{i}" for i in range(12)), ran  # each once, none twice
