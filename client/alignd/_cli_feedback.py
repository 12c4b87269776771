"""``alignd feedback ...``: feedback sets from the command line (create, list, get, delete, next, label,
ratings, export). Registered by :func:`alignd.cli.build_parser`; same output and exit-code conventions."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TextIO

from alignd._client import Client

# cli.py imports this module; import its helpers lazily to keep the import graph one-way.


def _cli() -> Any:
    from alignd import cli

    return cli


FEEDBACK_COLUMNS: list[tuple[str, Callable[[Any], str]]] = [
    ("id", lambda s: s.id),
    ("name", lambda s: str(s.name or "-")),
    ("candidates", lambda s: str(s.candidates or "-")),
    ("round", lambda s: "-" if s.round is None else str(s.round)),
    ("items", lambda s: str(s.num_items)),
    ("complete", lambda s: f"{s.progress.items_complete}/{s.progress.items}" if s.progress else "-"),
    ("labels", lambda s: str(s.progress.labels) if s.progress else "-"),
]


def cmd_create(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    created = client.feedback_sets.create(
        name=args.name,
        candidates=args.candidates,
        annotations_per_item=args.annotations_per_item,
        round=args.round,
    )
    _cli()._show_one(created, args, out)
    return 0


def cmd_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    cli = _cli()
    page = client.feedback_sets.list(round=args.round, limit=cli._page_size(args))
    cli._show_list(cli._limited(page, None if args.all else args.limit), FEEDBACK_COLUMNS, args, out)
    return 0


def cmd_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    _cli()._show_one(client.feedback_sets.get(args.id), args, out)
    return 0


def cmd_delete(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    client.feedback_sets.delete(args.id)
    if args.json:
        _cli()._print_json({"id": args.id, "deleted": True}, out)
    return 0


def cmd_next(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    item = client.feedback_sets.next(args.id, annotator=args.annotator)
    if args.json:
        _cli()._print_json(item, out)
        return 0
    if item is None:
        out.write("nothing left for this annotator\n")
        return 0
    prompt = item.prompt if isinstance(item.prompt, str) else json.dumps(item.prompt, ensure_ascii=False)
    out.write(f"item {item.id}\nprompt: {prompt}\n")
    for response in item.responses:
        out.write(f"  {response.id}: {response.text}\n")
    return 0


def cmd_label(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    scores = None
    if args.scores:
        scores = {}
        for pair in args.scores.split(","):
            key, _, value = pair.partition("=")
            try:
                scores[key.strip()] = float(value)
            except ValueError:
                raise _cli().UsageError(f"--scores wants ID=NUMBER,...; got {pair!r}") from None
    label = client.feedback_sets.label(
        args.id,
        item=args.item,
        annotator=args.annotator,
        ranking=args.ranking.split(",") if args.ranking else None,
        scores=scores,
        a=args.a,
        b=args.b,
        winner=args.winner,
        skip=args.skip,
    )
    _cli()._show_one(label, args, out)
    return 0


def cmd_ratings(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    ratings = client.feedback_sets.ratings(args.id)
    if args.json:
        _cli()._print_json(ratings, out)
        return 0
    p, agreement = ratings.progress, ratings.agreement
    if p is not None:
        out.write(
            f"items {p.items_complete}/{p.items} complete, {p.labels} labels, {p.annotators} annotators\n"
        )
    if agreement is not None:
        out.write(f"agreement: pairwise {agreement.pairwise}, Kendall's W {agreement.kendalls_w}\n")
    rows = [
        [item.item, r.id, f"{r.elo:.1f}", f"{r.bradley_terry:+.3f}", str(r.comparisons)]
        for item in ratings.items
        for r in sorted(item.responses, key=lambda r: item.order.index(r.id) if r.id in item.order else 0)
    ]
    _cli()._table(rows, ["item", "response", "elo", "bradley_terry", "comparisons"], out)
    return 0


def cmd_export(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    dataset = client.feedback_sets.export(
        args.id,
        name=args.name,
        min_labels=args.min_labels,
        min_agreement=args.min_agreement,
        round=args.round,
    )
    _cli()._show_one(dataset, args, out)
    return 0


def add_feedback_commands(groups: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    feedback = groups.add_parser("feedback", help="feedback sets: human rankings of candidates")
    sub = feedback.add_subparsers(dest="command", required=True)
    p = leaf(sub, "create", cmd_create, "put a candidates dataset up for labelling")
    p.add_argument("--name", required=True)
    p.add_argument("--candidates", required=True, metavar="DATASET_ID")
    p.add_argument("--annotations-per-item", type=int)
    p.add_argument("--round", type=int)
    p = leaf(sub, "list", cmd_list, "list feedback sets")
    p.add_argument("--round", type=int)
    _cli()._add_list_options(p)
    leaf(sub, "get", cmd_get, "show a feedback set and its progress").add_argument("id")
    leaf(sub, "delete", cmd_delete, "delete a feedback set").add_argument("id")
    p = leaf(sub, "next", cmd_next, "the next item for an annotator")
    p.add_argument("id")
    p.add_argument("--annotator", required=True)
    p = leaf(sub, "label", cmd_label, "label an item: --ranking, --scores, --a/--b/--winner, or --skip")
    p.add_argument("id")
    p.add_argument("--item", required=True)
    p.add_argument("--annotator", required=True)
    p.add_argument("--ranking", metavar="ID,ID,...", help="response ids, best first")
    p.add_argument("--scores", metavar="ID=NUM,...")
    p.add_argument("--a")
    p.add_argument("--b")
    p.add_argument("--winner", choices=("a", "b", "tie"))
    p.add_argument("--skip", action="store_true")
    leaf(sub, "ratings", cmd_ratings, "Elo and Bradley-Terry per response; agreement").add_argument("id")
    p = leaf(sub, "export", cmd_export, "export rated items as a ranking dataset")
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--min-labels", type=int)
    p.add_argument("--min-agreement", type=float)
    p.add_argument("--round", type=int)
