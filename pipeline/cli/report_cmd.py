from pipeline.cli.common import print_json


def add_parser(sub):
    p = sub.add_parser("report", help="Markdown + self-contained HTML + JSON comparison report of a bench result")
    p.add_argument("--bench", required=True, help="JSON written by `bertforge bench`")
    p.add_argument("--out", required=True, help="folder for report.md, report.html and report.json")
    p.add_argument("--final", default=None, help="artifact name of the final model (default: the bench's, else the last non-baseline)")
    p.add_argument("--teacher", default=None, help="artifact name or path of the teacher (default: found from stages and lineage)")
    p.add_argument("--device", default=None, help="device of the headline numbers (default: cpu when measured)")
    p.add_argument("--loadtest", nargs="+", default=[], metavar="RUN",
                   help="load-test sweeps to add as the serving section (bertforge loadtest --mode sweep --out RUN)")
    p.set_defaults(func=run)


def run(args):
    from pathlib import Path

    from pipeline.bench import read_bench
    from pipeline.report import ReportConfig, build_report

    bench = read_bench(args.bench)
    command = " ".join(["bertforge report --bench", args.bench, "--out", args.out]
                       + [f"--{k} {getattr(args, k)}" for k in ("final", "teacher", "device") if getattr(args, k)]
                       + (["--loadtest", *args.loadtest] if args.loadtest else []))
    if bench.get("command"):
        command = bench["command"] + "\n" + command
    rep = build_report(bench, args.out, ReportConfig(final=args.final, teacher=args.teacher, device=args.device,
                                                   command=command, loadtest=args.loadtest))
    out = Path(args.out)
    print_json({"report": [str(out / f) for f in ("report.md", "report.html", "report.json")], "final": rep["final"],
                "teacher": rep["teacher"], "final_score": rep["final_score"], "teacher_score": rep["teacher_score"],
                "ratios": rep["ratios"]})
