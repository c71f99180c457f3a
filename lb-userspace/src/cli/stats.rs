//! `lb stats`: why the programs did what they did, per reason, summed over CPUs (`-o wide`
//! shows each CPU).

use std::collections::BTreeMap;

use super::{CliError, Format, Pins, emit, open, table};

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub format: Format,
    #[command(flatten)]
    pub pins: Pins,
}

pub fn run(args: StatsArgs) -> Result<(), CliError> {
    let maps = open(&args.pins)?;
    let counters = maps.stats()?;
    let totals: BTreeMap<&str, u64> = counters
        .iter()
        .map(|(reason, per_cpu)| (reason.name(), per_cpu.iter().sum()))
        .collect();
    emit(args.format.output, &totals, |wide| {
        let cpus = counters.first().map_or(0, |(_, per_cpu)| per_cpu.len());
        let mut header = vec!["REASON".to_owned(), "COUNT".to_owned()];
        if wide {
            header.extend((0..cpus).map(|cpu| format!("CPU{cpu}")));
        }
        let mut table = table::<0>([]);
        table.set_header(header);
        for (reason, per_cpu) in &counters {
            let mut row = vec![
                reason.name().to_owned(),
                per_cpu.iter().sum::<u64>().to_string(),
            ];
            if wide {
                row.extend(per_cpu.iter().map(ToString::to_string));
            }
            table.add_row(row);
        }
        table.to_string()
    })
}
