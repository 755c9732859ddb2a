"""The watched folders as (parent wd, name): paths, moves, removals, lookups, compaction."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.watchtree import ROOT_PARENT, WatchTree

TOP = b"/srv/photos"


def tree_of(*entries: tuple[int, int, bytes]) -> WatchTree:
    tree = WatchTree(TOP)
    tree.place(1, ROOT_PARENT, b"")
    for wd, parent, name in entries:
        tree.place(wd, parent, name)
    return tree


def test_paths_are_rebuilt_from_the_names_above() -> None:
    tree = tree_of((2, 1, b"2024"), (3, 2, b"trip"), (7, 3, b"\xff raw"))
    assert tree.path(1) == TOP
    assert tree.path(2) == b"/srv/photos/2024"
    assert tree.path(7) == b"/srv/photos/2024/trip/\xff raw"
    assert tree.path(4) is None and tree.path(0) is None and tree.path(10_000) is None
    assert len(tree) == 4 and 3 in tree and 4 not in tree


def test_a_moved_folder_takes_everything_below_it_along() -> None:
    tree = tree_of((2, 1, b"a"), (3, 2, b"b"), (4, 3, b"c"), (5, 1, b"x"))
    tree.place(3, 5, b"renamed")
    assert tree.path(4) == b"/srv/photos/x/renamed/c"
    tree.place(3, 5, b"renamed")  # placed again where it is: nothing changes
    assert tree.path(3) == b"/srv/photos/x/renamed"
    assert len(tree) == 5


def test_below_a_removed_folder_nothing_has_a_path() -> None:
    tree = tree_of((2, 1, b"a"), (3, 2, b"b"))
    assert tree.remove(2) and not tree.remove(2)
    assert tree.path(3) is None
    assert len(tree) == 2


def test_a_folder_met_again_below_itself_is_refused() -> None:
    """A bind mount of an ancestor shows the kernel the same folder, so the same wd, below itself."""
    tree = tree_of((2, 1, b"a"), (3, 2, b"b"))
    assert not tree.place(2, 3, b"loop") and not tree.place(1, 3, b"root-again") and not tree.place(3, 3, b"b")
    assert tree.path(3) == b"/srv/photos/a/b" and tree.path(1) == TOP
    assert tree.place(3, 1, b"b")  # a real move up is no cycle


def test_a_cycle_only_broken_bookkeeping_could_make_ends_in_no_path() -> None:
    tree = tree_of((2, 1, b"a"), (3, 2, b"b"))
    tree._parent[2] = 3  # what place() refuses to do
    assert tree.path(3) is None and tree.path(2) is None
    assert tree.below([3]) == [2, 3]


def test_find_and_below() -> None:
    tree = tree_of((2, 1, b"a"), (3, 2, b"b"), (4, 3, b"c"), (5, 1, b"b"), (6, 5, b"b"), (9, 2, b"b2"))
    assert tree.find(b"/srv/photos/a/b") == [3]
    assert tree.find(b"/srv/photos/b/b") == [6]
    assert tree.find(TOP) == [1]
    assert tree.find(b"/srv/photosb") == [] and tree.find(b"/elsewhere/a") == []
    tree.place(8, 2, b"b")  # a new folder took the name before the old one's move was read
    assert tree.find(b"/srv/photos/a/b") == [3, 8]
    assert tree.below([3, 8]) == [3, 4, 8]
    assert tree.below([2]) == [2, 3, 4, 8, 9]
    assert tree.below([1]) == [1, 2, 3, 4, 5, 6, 8, 9]
    assert tree.below([77]) == []


def test_marking_names_the_folders_a_walk_did_not_meet() -> None:
    tree = tree_of((2, 1, b"a"), (3, 2, b"b"), (4, 1, b"c"))
    tree.start_marking()
    for wd in (1, 2, 4, 3000):
        tree.mark(wd)
    assert tree.unmarked() == [3]
    assert tree.unmarked() == []  # the pass is over
    tree.mark(3)  # outside a pass: nothing to do
    assert tree.unmarked() == []


def test_names_replaced_again_and_again_are_compacted_and_stay_right() -> None:
    tree = tree_of((2, 1, b"a"), (3, 2, b"b"))
    for i in range(6000):  # ~1.5 MB of replaced names: more than the compaction threshold
        tree.place(2, 1, b"%04d" % i + b"n" * 250)
        tree.place(3, 2, b"%04d" % i)
    assert tree.path(3) == b"/srv/photos/5999" + b"n" * 250 + b"/5999"
    assert len(tree._names) < 1 << 20  # compacted: 1.5 MB of names were replaced


def test_wds_far_apart_grow_the_arrays_as_needed() -> None:
    tree = tree_of((100_000, 1, b"far"), (100_001, 100_000, b"further"))
    assert tree.path(100_001) == b"/srv/photos/far/further"
    assert tree.wds() == [1, 100_000, 100_001]


# Operations on a tree of up to 12 folders: place wd under parent with a name, or remove wd.
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("place"), st.integers(2, 13), st.integers(1, 13), st.sampled_from([b"a", b"b", b"cc"])),
        st.tuples(st.just("remove"), st.integers(1, 13), st.just(0), st.just(b"")),
    ),
    max_size=60,
)


def ancestors(model: dict[int, tuple[int, bytes]], wd: int) -> set[int]:
    found: set[int] = set()
    while wd in model and wd not in found:
        found.add(wd)
        wd = model[wd][0]
    return found


@given(_OPS)
def test_paths_match_a_plain_map_of_every_folder_whatever_the_operations(
    ops: list[tuple[str, int, int, bytes]],
) -> None:
    """Against a model that keeps (parent, name) in a dict and walks it up: the same paths,
    the same gaps (an ancestor removed) and the same cycles (refused), after compactions too."""
    tree = WatchTree(TOP)
    model: dict[int, tuple[int, bytes]] = {1: (ROOT_PARENT, b"")}
    tree.place(1, ROOT_PARENT, b"")
    for op, wd, parent, name in ops:
        if op == "place":
            cycle = wd in model and (wd == parent or wd in ancestors(model, parent))
            assert tree.place(wd, parent, name) == (not cycle)
            if not cycle:
                model[wd] = (parent, name)
        else:
            assert tree.remove(wd) == (model.pop(wd, None) is not None)
        if len(tree._names) > 64:
            tree._compact()

    def model_path(wd: int) -> bytes | None:
        names: list[bytes] = []
        seen: set[int] = set()
        while wd in model and wd not in seen:
            seen.add(wd)
            up, name = model[wd]
            if up == ROOT_PARENT:
                return b"/".join([TOP, *reversed(names)])
            names.append(name)
            wd = up
        return None

    assert tree.wds() == sorted(model)
    assert len(tree) == len(model)
    for wd in range(15):
        assert tree.path(wd) == model_path(wd), wd
    for wd in model:
        path = model_path(wd)
        if path is not None:
            assert wd in tree.find(path)
