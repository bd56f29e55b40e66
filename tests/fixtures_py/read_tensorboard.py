"""Reads a TensorBoard log folder as TensorBoard does (its EventAccumulator, orphaned events
purged) and prints {tag: [[step, value], ...]} as JSON. Used by tests/it/train.rs."""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator

acc = event_accumulator.EventAccumulator(
    sys.argv[1], size_guidance={event_accumulator.SCALARS: 0}, purge_orphaned_data=True
)
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
