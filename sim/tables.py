"""The tables the traffic simulator writes each simulated day: columns and DuckDB types.

One source for each schema: ``sim.traffic`` builds its rows with these columns and
``flywheel.store`` creates its tables from them (adding ``experiment_id`` in front), so a
column added here reaches both. What each column means is documented with the run store.
"""

from __future__ import annotations

# When, in which arm and life, by which policy, which user and character: the leading
# columns of every session and turn.
_SERVED = {
    "day": "INTEGER",
    "period": "VARCHAR",
    "arm": "VARCHAR",
    "life": "VARCHAR",
    "policy": "VARCHAR",
    "session_id": "VARCHAR",
    "user_id": "VARCHAR",
    "character": "VARCHAR",
}
SESSIONS = {
    **_SERVED,
    "start_hour": "DOUBLE",
    "end_hour": "DOUBLE",
    "n_user_messages": "INTEGER",
    "n_bot_turns": "INTEGER",
    "likes": "INTEGER",
    "reported": "BOOLEAN",
    "ended_by_user": "BOOLEAN",
}
TURNS = {
    **_SERVED,
    "turn_index": "INTEGER",
    "hour": "DOUBLE",
    "user_message": "VARCHAR",
    "bot_reply": "VARCHAR",
    "completion_tokens": "INTEGER",
    "features": "JSON",
    "checks": "JSON",
    "follows_all": "BOOLEAN",
    "violates_any": "BOOLEAN",
    "unsafe": "BOOLEAN",
    "gold_satisfaction": "DOUBLE",
    "novelty": "DOUBLE",
    "continued": "BOOLEAN",
    "liked": "BOOLEAN",
    "reported": "BOOLEAN",
}
USER_DAYS = {
    "user_id": "VARCHAR",
    "arm": "VARCHAR",
    "life": "VARCHAR",
    "day": "INTEGER",
    "period": "VARCHAR",
    "weekday": "INTEGER",
    "active": "BOOLEAN",
    "sessions": "INTEGER",
    "messages": "INTEGER",
    "bot_replies": "INTEGER",
    "likes": "INTEGER",
    "reports": "INTEGER",
    "violations": "INTEGER",
    "follows": "INTEGER",
    "unsafe_replies": "INTEGER",
    "completion_tokens": "INTEGER",
    "gold_satisfaction": "DOUBLE",
    "novelty": "DOUBLE",
}
