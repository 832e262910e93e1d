"""Per-rank output (jobs/ranklog.py): the splitter over each launcher's real tagged output,
any chunking of a tagged stream giving the same rank logs, and a restart at any point
(after a kill -9 or a failed write) leaving them consistent with the combined log.

The captures in tests/data/launchers/*.tagged.txt are each launcher's own output for 3
ranks of `printf "a\\nb"; printf "c\\n"; echo "err [3] x" >&2; printf "noeol"` (with pauses
between), run with the option a job with rank_output gets (flavour.py)."""

import itertools
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlbench_daemon import config
from mlbench_daemon.errors import BadRequest
from mlbench_daemon.jobs import failure, flavour, validate
from mlbench_daemon.jobs.ranklog import RankLogs, Splitter
from mlbench_daemon.store import Store, StoreError

pytestmark = pytest.mark.logic

DATA = Path(__file__).resolve().parent / "data" / "launchers"
FLAVOURS = list(flavour.FLAVOURS)
ENV = {"MLBENCH_DAEMON_DISCOVERY_SERVICE": "w.default.svc.cluster.local"}


def split(name, stream, cuts=()):
    """Each rank's bytes from `stream` fed in pieces cut at `cuts`."""
    s = Splitter(flavour.get(name).tag)
    out = {}
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in itertools.pairwise(bounds):
        for rank, chunks in s.feed(stream[a:b]).items():
            out[rank] = out.get(rank, b"") + b"".join(chunks)
    for rank, chunks in s.feed(b"", final=True).items():
        out[rank] = out.get(rank, b"") + b"".join(chunks)
    assert s.held == b"" and s.consumed == len(stream)
    return out


def tag(name, rank):
    return {
        "openmpi4": f"[1,{rank}]<stdout>:",
        "openmpi5": f"[1,{rank}]<stderr>: ",
        "mpich": f"[{rank}]<rank>: ",
    }[name].encode()


@pytest.mark.parametrize("name", FLAVOURS)
def test_each_launchers_real_output_splits_into_what_each_rank_wrote(name):
    """Partial lines: OpenMPI 4 and Hydra put the next rank's tag right after a rank's
    "b" (no newline), OpenMPI 5 keeps "bc" whole; the last "noeol" of every rank shares
    one line.  "[3] x" in the text is no tag."""
    stream = (DATA / f"{name}.tagged.txt").read_bytes()
    assert split(name, stream) == {r: b"a\nbc\nerr [3] x\nnoeol" for r in range(3)}


@pytest.mark.parametrize("name", FLAVOURS)
def test_launcher_text_between_tagged_lines_stays_out_of_the_rank_logs(name):
    stream = (
        tag(name, 0) + b"zero\n"
        + b"-----\nmpirun noticed that process rank 1 exited\n"
        + tag(name, 1) + b"one\n" + b"[1] not a tag\n"
    )  # fmt: skip
    assert split(name, stream) == {0: b"zero\n", 1: b"one\n"}


# A stream as a launcher writes it: pieces of ranks' output, each tagged; a piece ends
# with a newline or not (the next tag then follows on the same line); after a newline the
# launcher may print a line of its own.  The text holds '[' and tag look-alikes.
TEXT = st.text(alphabet="ab [],:<>0123456789rankstdout", max_size=30).map(str.encode)


@st.composite
def tagged_stream(draw, name):
    pieces = draw(
        st.lists(
            st.tuples(st.integers(0, 12), TEXT, st.booleans(), st.one_of(st.none(), TEXT)),
            max_size=30,
        )
    )
    stream, want = b"", {}
    for rank, text, newline, launcher in pieces:
        text = flavour.get(name).tag.sub(b"", text)  # a tag inside a rank's text is a tag
        if not text and not newline:
            continue
        stream += tag(name, rank) + text + (b"\n" if newline else b"")
        want[rank] = want.get(rank, b"") + text + (b"\n" if newline else b"")
        if newline and launcher is not None and not flavour.get(name).tag.search(launcher):
            stream += launcher + b"\n"
    return stream, want


@pytest.mark.parametrize("name", FLAVOURS)
@settings(max_examples=150, deadline=None)  # x3 launchers: 450 streams
@given(data=st.data())
def test_any_chunking_of_a_tagged_stream_gives_the_same_rank_logs(name, data):
    stream, want = data.draw(tagged_stream(name))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert split(name, stream) == want
    assert split(name, stream, cuts) == want


# --- RankLogs: files, checkpoint, restarts ----------------------------------------------


def rank_logs_on_disk(store, job_id):
    return {
        r: Path(store.rank_log_path(job_id, r)).read_bytes()
        for r in store.rank_log_sizes(job_id)
        if os.path.getsize(store.rank_log_path(job_id, r))
    }


@pytest.mark.parametrize("name", FLAVOURS)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_restart_anywhere_leaves_the_rank_logs_as_the_combined_log_says(name, data, tmp_path):
    """The combined log grows in chunks; after any of them the daemon may die (the rank
    logs then hold bytes past their checkpoint, or a write failed half-way) and a new
    RankLogs takes over: at the end every rank log is exactly its rank's output."""
    stream, want = data.draw(tagged_stream(name))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    deaths = set(data.draw(st.lists(st.integers(0, len(cuts)), max_size=3)))
    every = data.draw(st.integers(1, 64))  # checkpoint bytes
    store = Store(str(tmp_path / f"s{len(os.listdir(tmp_path))}"))
    job_id = "00000000000000000001"
    ranks = RankLogs(store, job_id, name, checkpoint_bytes=every)
    bounds = [0, *cuts, len(stream)]
    with open(store.log_path(job_id), "ab", buffering=0) as log:
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            log.write(stream[a:b])
            ranks.advance()
            if i in deaths:  # kill -9: nothing more is written; a new daemon takes over
                ranks.close()
                ranks = RankLogs(store, job_id, name, checkpoint_bytes=every)
    ranks.advance(final=True)
    assert rank_logs_on_disk(store, job_id) == want
    again = RankLogs(store, job_id, name, checkpoint_bytes=every)  # a restart after the end
    again.advance(final=True)
    assert rank_logs_on_disk(store, job_id) == want


def test_a_rank_log_longer_than_its_checkpoint_is_cut_back_and_not_doubled(tmp_path):
    store = Store(str(tmp_path))
    job_id = "00000000000000000002"
    t = tag("openmpi4", 2)
    Path(store.log_path(job_id)).write_bytes(t + b"one\n")
    ranks = RankLogs(store, job_id, "openmpi4", checkpoint_bytes=1)
    ranks.advance()  # checkpoint after "one"
    with open(store.log_path(job_id), "ab") as f:
        f.write(t + b"two\n")
    ranks.advance(final=False)
    ranks._checkpoint = lambda: None  # dies before the next checkpoint
    with open(store.log_path(job_id), "ab") as f:
        f.write(t + b"three\n")
    ranks.advance()
    ranks.close()
    checkpoint = Path(store.rank_checkpoint_path(job_id)).read_text()
    assert Path(store.rank_log_path(job_id, 2)).read_bytes() == b"one\ntwo\nthree\n"
    again = RankLogs(store, job_id, "openmpi4")
    again.advance(final=True)
    assert Path(store.rank_log_path(job_id, 2)).read_bytes() == b"one\ntwo\nthree\n"
    assert checkpoint != Path(store.rank_checkpoint_path(job_id)).read_text()


def test_a_checkpoint_that_does_not_fit_splits_again_from_the_start(tmp_path):
    """A host crash may lose a tail of the combined log that the checkpoint covered."""
    store = Store(str(tmp_path))
    job_id = "00000000000000000003"
    t = tag("mpich", 0)
    Path(store.log_path(job_id)).write_bytes(t + b"x\n" + t + b"y\n")
    RankLogs(store, job_id, "mpich").advance(final=True)
    Path(store.log_path(job_id)).write_bytes(t + b"x\n")  # the tail is gone
    RankLogs(store, job_id, "mpich").advance(final=True)
    assert Path(store.rank_log_path(job_id, 0)).read_bytes() == b"x\n"
    Path(store.rank_checkpoint_path(job_id)).write_text("{not json")
    RankLogs(store, job_id, "mpich").advance(final=True)
    assert Path(store.rank_log_path(job_id, 0)).read_bytes() == b"x\n"


def test_a_failed_write_is_a_store_error_and_the_next_advance_repairs(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    job_id = "00000000000000000004"
    t = tag("openmpi5", 1)
    Path(store.log_path(job_id)).write_bytes(t + b"first\n")
    ranks = RankLogs(store, job_id, "openmpi5")
    ranks.advance()
    with open(store.log_path(job_id), "ab") as f:
        f.write(t + b"second\n")
    real = RankLogs._write

    def half(self, pieces):
        real(self, {r: [b"".join(c)[:3]] for r, c in pieces.items()})
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RankLogs, "_write", half)
    with pytest.raises(StoreError, match="No space left"):
        ranks.advance()
    monkeypatch.setattr(RankLogs, "_write", real)
    ranks.advance(final=True)
    assert Path(store.rank_log_path(job_id, 1)).read_bytes() == b"first\nsecond\n"


def test_prune_removes_the_rank_logs_and_counts_their_bytes(tmp_path):
    store = Store(str(tmp_path))
    old = store.create(state="succeeded", finished=1.0).id
    new = store.create(state="succeeded", finished=2.0).id
    for job_id in (old, new):
        Path(store.log_path(job_id)).write_bytes(tag("openmpi4", 0) + b"y" * 100 + b"\n")
        RankLogs(store, job_id, "openmpi4").advance(final=True)
    assert store._logs_bytes() > 4 * 100  # both logs, both rank logs
    # the two combined logs fit in 300 bytes; with the rank logs counted they do not
    assert store.prune(keep_days=0, max_bytes=300, now=10_000.0) == [old]
    assert not os.path.exists(store.rank_dir(old)) and os.path.exists(store.rank_dir(new))


# --- the option in the argv, and attribution reading tagged output ------------------------


def test_the_tag_option_goes_right_after_the_fixed_options():
    hosts, prog = ["10.0.0.1:2", "10.0.0.2"], ["/bin/prog"]
    f = flavour.get
    assert f("openmpi4").argv("/l", ["--a"], hosts, 3, [], prog, True)[:3] == [
        "/l", "--tag-output", "--a",
    ]  # fmt: skip
    assert f("openmpi5").argv("/l", [], hosts, 3, [], prog, True)[:3] == ["/l", "--output", "tag"]
    assert f("mpich").argv("/l", [], hosts, 3, [], prog, True)[:5] == [
        "/l", "-launcher", "ssh", "-prepend-pattern", "[%r]<rank>: ",
    ]  # fmt: skip
    for name in FLAVOURS:
        assert f(name).argv("/l", [], hosts, 3, [], prog) == f(name).argv(
            "/l", [], hosts, 3, [], prog, False
        )
        argv = f(name).argv("/l", [], hosts, None, [], prog, True)
        assert flavour.rank_count(name, argv) == 3
        assert flavour.rank_count(name, f(name).argv("/l", [], hosts, 7, [], prog)) == 7


def test_rank_map_reads_past_an_option_with_a_value():
    """`--output tag` (OpenMPI 5's tag option) used to end the launcher's part at "tag"."""
    argv = ["/l", "--output", "tag", "--bind-to", "core", "--host", "a:2,b", "-np", "3", "/p"]
    assert failure.rank_map(argv, "b") == ["b", "a", "a"]
    assert failure.rank_map(["/l", "--tag-output", "--host", "a,b", "/p"], "a") == ["a", "b"]


ABORT = """[1,0]<stdout>:rank 0 of 3 on 10.0.0.1: sum=3 expected=3
[1,1]<stderr>:--------------------------------------------------------------------------
[1,1]<stderr>:MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD
[1,1]<stderr>:with errorcode 7.
[1,1]<stderr>:
[1,1]<stderr>:NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.
"""


def test_attribution_reads_a_rank_text_spread_over_tagged_lines():
    nodes = [failure.NodeRef("w-0", "10.0.0.1"), failure.NodeRef("w-1", "10.0.0.2")]
    f = failure.attribute(
        state="failed", reason=None, exit_code=7, output=ABORT,
        command=["/l", "--tag-output", "--host", "10.0.0.1,10.0.0.2,10.0.0.2:2", "/p"],
        master="w-0", master_ip="10.0.0.1", nodes=nodes,
    )  # fmt: skip
    assert (f["kind"], f["rank"], f["exit_code"], f["node"]) == ("rank-exit", 1, 7, "w-1")
    assert "MPI_Abort" in f["message"]
    assert re.search(r"\[1,\d\]<std", flavour.untag("openmpi4", ABORT)) is None


@pytest.mark.parametrize(
    "args",
    [
        ["--output-filename", "/tmp/out"],
        ["-output-filename", "/tmp/out"],
        ["-outfile-pattern", "out.%r"],
        ["-errfile-pattern", "err.%r"],
        ["--output", "tag,dir=/tmp/out"],
        ["--output=file=/tmp/out"],
    ],
)
def test_mpi_args_refuse_options_that_move_output_into_files(args):
    with pytest.raises(config.ConfigError, match=r"^mpi\.args .*: must not hold .*rank_output"):
        config.load(None, {**ENV, "MLBENCH_DAEMON_MPI_ARGS": json.dumps(args)})


def test_mpi_args_keep_other_output_options():
    args = ["--output", "tag", "--mca", "btl", "self,tcp", "-outfile"]
    assert config.load(None, {**ENV, "MLBENCH_DAEMON_MPI_ARGS": json.dumps(args)}).mpi.args == args


def test_rank_output_is_a_request_flag():
    assert validate({"rank_output": True}, ["/p"]).rank_output is True
    assert validate({}, ["/p"]).rank_output is False
    with pytest.raises(BadRequest, match="rank_output must be true or false") as info:
        validate({"rank_output": 1}, ["/p"])
    assert info.value.field == "rank_output"
