"""A Ray Data source that re-shuffles a table of small rows every epoch, before any heavy work.

Training rows are paths and captions (or cache indices): a few hundred bytes each. Shuffling
them fully each epoch is cheap on the process that plans the read, so this source does that in
`get_read_tasks`, which Ray Data calls at the start of every execution (= every epoch, also on
Ray Train's split coordinator), and cuts the permutation into read tasks of `rows_per_task`
rows. Compared with blocks whose order `randomize_block_order` re-draws:
- every epoch is a full permutation, as LAVIS's DistributedSampler gives, so no local shuffle
  buffer is needed in the training workers (that buffer copies every decoded image once more);
- there is no all-to-all operator, so Ray Data fuses the read with the decode map into one task
  per `rows_per_task` rows (`qformer bench data` measures the difference).

The permutation is seeded by (seed, pass). The pass is the training state's: the loop writes it (and
the tasks already trained on, which are then not read again) into a `StreamPlan` that
`get_read_tasks` reads (qformer.data.position); without a plan every execution is pass 0.
Each task is one read unit (`unit`, `unit_rows` columns, chunk 0 and last). With `seed_column`,
every read task also adds that column holding one seed drawn from (seed, pass, task index), so the
decode task can draw its augmentations reproducibly.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from qformer.data.position import ROW, UNIT, UNIT_ROWS, encode_unit, read_plan


class EpochShuffledRows(Datasource):
    def __init__(self, table: pa.Table, rows_per_task: int, seed: int | tuple[int, ...], name: str = "TrainRows",
                 seed_column: str | None = None, plan=None, task_base: int = 0, stream: str | None = None) -> None:
        if rows_per_task < 1:
            raise ValueError(f"rows_per_task must be >= 1, got {rows_per_task}")
        self._table, self._rows_per_task, self._name = table, int(rows_per_task), name
        self._seed = tuple(int(s) for s in np.atleast_1d(seed))  # e.g. (run.seed, stream)
        self._seed_column = seed_column
        self._plan = plan  # qformer.data.position.StreamPlan actor, or None
        self._stream = stream or name  # this source's key in the plan
        self._task_base = int(task_base)  # numbers this source's tasks apart from others of the same stream

    def get_name(self) -> str:
        return self._name

    def num_tasks(self) -> int:
        return max(1, -(-self._table.num_rows // self._rows_per_task))

    def estimate_inmemory_data_size(self) -> int:
        return int(self._table.nbytes)

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of execution `epoch`, in read order."""
        return np.random.default_rng((*self._seed, int(epoch))).permutation(self._table.num_rows)

    def task_seed(self, epoch: int, task: int) -> int:
        return int(np.random.default_rng((*self._seed, int(epoch), int(task))).integers(2**62))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # `parallelism` is ignored: the task size is a training setting (run.data.task_rows)
        position = read_plan(self._plan, self._stream)
        epoch = position.pass_
        order = self.order(epoch)
        tasks = []
        for index, start in enumerate(range(0, len(order), self._rows_per_task)):
            task = self._task_base + index
            if position.rows_skipped_by(task, 0):
                continue
            unit = encode_unit(task, 0, True)
            rows = order[start:start + self._rows_per_task]
            offsets = position.rows_to_read(unit, len(rows))  # a resumed pass leaves out rows trained on
            if not len(offsets):
                continue
            part = self._table.take(pa.array(rows[offsets]))
            n = part.num_rows
            part = part.append_column(UNIT, pa.array(np.full(n, unit, np.int64)))
            part = part.append_column(ROW, pa.array(offsets.astype(np.int64)))
            part = part.append_column(UNIT_ROWS, pa.array(np.full(n, n, np.int64)))
            if self._seed_column:
                seed = self.task_seed(epoch, index)
                part = part.append_column(self._seed_column, pa.array(np.full(n, seed, np.int64)))
            meta = BlockMetadata(num_rows=part.num_rows, size_bytes=part.nbytes, exec_stats=None, input_files=None)
            tasks.append(ReadTask(lambda part=part: [part], meta, schema=part.schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def epoch_shuffled_dataset(table: pa.Table, rows_per_task: int, seed: int | tuple[int, ...], *, num_cpus: float | None = None,
                           name: str = "TrainRows", seed_column: str | None = None, plan=None, task_base: int = 0,
                           stream: str | None = None):
    """`table`'s rows as a Ray Dataset, fully re-shuffled every pass, one block per read task. `stream`
    (default `name`) is its key in `plan`."""
    source = EpochShuffledRows(table, rows_per_task, seed, name, seed_column, plan, task_base, stream)
    kwargs = {"num_cpus": float(num_cpus)} if num_cpus is not None else {}
    # 1, not the task count: when Ray is asked for more blocks than there are read tasks (a resumed pass skips
    # some) it splits each task's block, which also stops the fusion with the decode map
    return ray.data.read_datasource(source, override_num_blocks=1, **kwargs)
