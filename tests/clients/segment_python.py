"""Sends events through Segment's official Python library, as a shop's
backend would, to a running `cdp-host serve`: gzip-compressed batches with
the write key in basic auth. Exits non-zero if the library reports any
error. Usage: segment_python.py HOST WRITE_KEY EVENTS"""

import sys

import segment.analytics as analytics

host, write_key, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
errors = []
client = analytics.Client(
    write_key,
    host=host,
    gzip=True,
    on_error=lambda error, batch: errors.append(f"{error} ({len(batch)} events)"),
    max_retries=2,
)
for i in range(events):
    client.track(
        user_id=f"py-{i}",
        event="Order Completed",
        properties={"email": f"py{i}@example.org", "revenue": 10 + i, "currency": "usd"},
        message_id=f"segment-python-{i}",
    )
client.flush()
client.shutdown()
if errors:
    print("segment-python: the library reported errors:", *errors, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"segment-python: {events} events sent with gzip=True")
