//! The edge benchmark: what a board on a metered link with little memory pays for running Lichen,
//! each figure printed beside its aim (issue "edge-grade efficiency"). It measures and does not
//! pass or fail; it exits non-zero only when a measurement could not be made at all.
//!
//! ```text
//! cargo build --release -p lichen
//! cargo bench -p lichen-tests --bench edge                # every section
//! cargo bench -p lichen-tests --bench edge -- memory link  # some sections
//! ```
//!
//! The bench finds `target/release/lichen` beside itself; `LICHEN_BIN` names another binary (an
//! absolute path). Sections that need a real API server read `LICHEN_E2E_KUBECONFIG` (as the e2e
//! tier does) and are reported as not measured without it. Each section is a module of its own
//! with `run(&mut Report)`; the table at the end is Markdown, for the README's Benchmarks section.

mod binaries;
mod link;
mod memory;
mod qos;
mod report;
mod throughput;

use report::Report;

/// The sections, in the order they run and print.
const SECTIONS: &[(&str, &str)] = &[
    ("link", "bytes between one node and a real API server, through a counting proxy"),
    ("memory", "resident memory idle, with 100 static pods, and over create/delete cycles"),
    ("qos1", "QoS 1 lines under the default rate limit, through a broker restart"),
    ("throughput", "QoS 1 throughput and latency beside a Mosquitto bridge in the same run"),
    ("binaries", "board binary sizes against cross/size-budget"),
];

fn main() -> std::process::ExitCode {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for w in &wanted {
        if !SECTIONS.iter().any(|(name, _)| name == w) {
            let names: Vec<&str> = SECTIONS.iter().map(|(n, _)| *n).collect();
            eprintln!("unknown section {w:?}; the sections are: {}", names.join(", "));
            return std::process::ExitCode::from(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let mut report = Report::default();
    for (name, what) in SECTIONS {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        println!("\n== {name}: {what}");
        let started = std::time::Instant::now();
        runtime.block_on(run_section(name, &mut report));
        println!("== {name} took {:.0} s", started.elapsed().as_secs_f64());
    }
    report.print();
    report.exit_code()
}

async fn run_section(name: &str, report: &mut Report) {
    match name {
        "link" => link::run(report).await,
        "qos1" => qos::run(report).await,
        "throughput" => throughput::run(report).await,
        "binaries" => binaries::run(report).await,
        "memory" => memory::run(report).await,
        _ => unreachable!("SECTIONS lists only sections run_section knows"),
    }
}
