//! `make model`: model-checks the refresh protocol with the product's own rules and prints what
//! it explored. `--deep`: the larger opt-in configuration. Exit 1 if a property breaks (its
//! trace is printed), or if the model never reached what it must reach.

use clap::Parser;
use xero_proving_ground::model::{Config, ProtocolModel, Rules, check};

#[derive(Parser)]
#[command(about = "Model-checks the refresh protocol with the product's own rules")]
struct Args {
    /// Three parties, more faults, a deeper search (minutes, not seconds).
    #[arg(long)]
    deep: bool,
    /// Explore this many steps instead of the configuration's depth.
    #[arg(long)]
    depth: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut config = if args.deep {
        Config::deep()
    } else {
        Config::quick()
    };
    if let Some(depth) = args.depth {
        config.depth = depth;
    }
    println!(
        "model check: {} parties, {} fault(s), {} crash(es), horizon {} ticks, depth {}",
        config.roles.len(),
        config.faults,
        config.crashes,
        config.horizon,
        config.depth
    );
    let report = check(ProtocolModel::new(config, Rules::product()));
    println!(
        "explored {} states ({} unique) to depth {} in {:.1} s",
        report.states,
        report.unique_states,
        report.max_depth,
        report.elapsed.as_secs_f64()
    );
    for (property, trace) in &report.counterexamples {
        println!("BROKEN: {property}\n{trace}");
    }
    for property in &report.unreached {
        println!("NOT REACHED: {property}");
    }
    if report.counterexamples.is_empty() && report.unreached.is_empty() {
        println!("every property holds in every state explored");
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
