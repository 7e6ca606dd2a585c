"""``cubelm features``: the book's Q&A feature store (§6.1.6) end to end on synthetic, timestamped user events.

    cubelm features demo --repo qa_repo          # build the repo, materialize, print a training join + online rows
    cubelm features materialize --repo qa_repo   # incremental: offline (parquet) -> online (SQLite) up to now
    cubelm features get --repo qa_repo --user u3 # online features of a user and the system preamble they give

Needs the ``feature-store`` extra (Feast); without it each verb exits with a one-line error naming the extra.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cubelm.cli import opt
from cubelm.errors import CubelmError

LANGUAGES = ("English", "French", "German", "Spanish", "Japanese")
TOPICS = ("python", "sql", "kubernetes", "statistics", "pytorch", "linux", "git", "networking")
RECENT = 3  # topics kept in recent_topics


def expertise_of(question_count: int) -> str:
    return "beginner" if question_count < 10 else "intermediate" if question_count < 40 else "expert"


def synthetic_events(num_users: int = 8, *, end: datetime | None = None, days: int = 60, events_per_user: int = 6,
                     seed: int = 0):
    """Timestamped user events: each event is a user asking a few questions on a topic, so question_count grows,
    expertise follows it, recent_topics shifts and, now and then, the preferred language changes. Event times are
    spread over the ``days`` before ``end``; every row is a new version of that user's profile."""
    import pandas as pd
    rng = random.Random(seed)
    end = end or datetime.now(timezone.utc)
    rows = []
    for u in range(num_users):
        lang, count, topics = rng.choice(LANGUAGES), 0, []
        times = sorted(end - timedelta(seconds=rng.uniform(0, days * 86400)) for _ in range(events_per_user))
        for t in times:
            count += rng.randint(1, 12)
            topics = [rng.choice(TOPICS), *[x for x in topics]][:RECENT]
            if rng.random() < 0.15:
                lang = rng.choice(LANGUAGES)
            rows.append({"user_id": f"u{u}", "preferred_language": lang, "expertise": expertise_of(count),
                         "recent_topics": list(topics), "question_count": count,
                         "event_timestamp": t.replace(microsecond=0), "created": t.replace(microsecond=0)})
    return pd.DataFrame(rows)


def _check_repo(repo: str) -> None:
    if not repo.strip():
        raise CubelmError("--repo must be a directory path")


@dataclass(slots=True, kw_only=True)
class DemoOptions:
    repo: str = opt(help="directory of the feature repo to create (feature_store.yaml, data/*.parquet, SQLite)")
    num_users: int = opt(8, help="synthetic users")
    days: int = opt(60, help="the events span this many days before now")
    events_per_user: int = opt(6, help="profile updates per user")
    ttl_days: float = opt(30.0, help="feature view TTL: older profile rows are treated as unknown")
    seed: int = opt(0, help="random seed of the synthetic events")

    def __post_init__(self) -> None:
        _check_repo(self.repo)
        if self.num_users < 1 or self.days < 1 or self.events_per_user < 1 or self.ttl_days <= 0:
            raise CubelmError("--num-users, --days, --events-per-user and --ttl-days must be positive")


def run_demo(o: DemoOptions) -> int:
    from cubelm.rag import features as F
    F.require_feast()  # first: pandas comes with the extra too
    import pandas as pd
    now = datetime.now(timezone.utc).replace(microsecond=0)
    events = synthetic_events(o.num_users, end=now, days=o.days, events_per_user=o.events_per_user, seed=o.seed)
    store = F.init_repo(o.repo, events, ttl=timedelta(days=o.ttl_days))
    print(f"[features] {len(events)} events of {o.num_users} users in {o.repo}/{F.EVENTS}; registry and online "
          f"store in {o.repo}/data/", file=sys.stderr)
    F.materialize(store, now)
    # training rows: each user at three instants; the join gives the profile as it was then (point in time)
    rng = random.Random(o.seed + 1)
    entity_df = pd.DataFrame([{"user_id": f"u{u}", "event_timestamp": now - timedelta(days=rng.uniform(0, o.days))}
                              for u in range(o.num_users) for _ in range(3)])
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_colwidth", 40):
        print("training join (point in time):")
        print(F.training_frame(store, entity_df).sort_values(["user_id", "event_timestamp"]).to_string(index=False))
        print("\nonline store (latest materialized):")
        print(pd.DataFrame(F.online_features(store, [f"u{u}" for u in range(o.num_users)])).to_string(index=False))
    msgs = F.personalize_messages(store, "u0", [{"role": "user", "content": "How do I undo a git commit?"}])
    print("\npersonalized chat for u0:")
    for m in msgs:
        print(f"  {m['role']}: {m['content']}")
    return 0


@dataclass(slots=True, kw_only=True)
class MaterializeOptions:
    repo: str = opt(help="feature repo directory (made by `cubelm features demo`)")

    def __post_init__(self) -> None:
        _check_repo(self.repo)


def run_materialize(o: MaterializeOptions) -> int:
    from cubelm.rag import features as F
    store = F.open_store(o.repo)
    end = datetime.now(timezone.utc)
    F.materialize(store, end)
    print(f"[features] materialized {F.VIEW} up to {end.isoformat(timespec='seconds')}", file=sys.stderr)
    return 0


@dataclass(slots=True, kw_only=True)
class GetOptions:
    repo: str = opt(help="feature repo directory (made by `cubelm features demo`)")
    user: list[str] = opt([], help="user id to look up in the online store (repeatable)")

    def __post_init__(self) -> None:
        _check_repo(self.repo)
        if not self.user:
            raise CubelmError("give at least one --user")


def run_get(o: GetOptions) -> int:
    from cubelm.rag import features as F
    store = F.open_store(o.repo)
    for row in F.online_features(store, o.user):
        print(row)
        print("  preamble:", F.preamble(row) or "(nothing known about this user)")
    return 0
