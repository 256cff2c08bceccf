//! The `process_*` metrics every Prometheus client library exports (named as
//! client_golang's process collector names them, so existing dashboards and alerts fit):
//! CPU time, memory, open descriptors against the limit, threads, start time. Read from
//! `/proc/self` at each scrape; nothing is kept between scrapes.
//!
//! Descriptors matter most: each open stream holds two (the client's and the upstream's),
//! so `process_open_fds / process_max_fds` is how full the proxy is before `accept` starts
//! failing.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use rustix::process::{Resource, getrlimit};

/// Reads the process's figures from `/proc/self` on each scrape.
#[derive(Debug, Default)]
pub(crate) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        // Without `/proc` (not Linux, or not mounted) there is nothing to say.
        if let Some(stat) = Stat::read() {
            let ticks = rustix::param::clock_ticks_per_second() as f64;
            let cpu = (stat.user_ticks + stat.system_ticks) as f64 / ticks;
            let counter = ConstCounter::new(cpu);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
            gauge(&mut encoder, "process_resident_memory_bytes", "Resident memory size in bytes", stat.resident_bytes)?;
            gauge(&mut encoder, "process_virtual_memory_bytes", "Virtual memory size in bytes", stat.virtual_bytes)?;
            gauge(&mut encoder, "process_threads", "Number of OS threads in the process", stat.threads)?;
            if let Some(boot) = boot_time() {
                let started = boot as f64 + stat.start_ticks as f64 / ticks;
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    started,
                )?;
            }
        }
        if let Some(open) = open_descriptors() {
            gauge(&mut encoder, "process_open_fds", "Number of open file descriptors", open)?;
        }
        // The soft limit, the one `accept` and `connect` fail against; Linux refuses an
        // unlimited one, so `None` does not happen there.
        if let Some(limit) = getrlimit(Resource::Nofile).current {
            gauge(&mut encoder, "process_max_fds", "Maximum number of open file descriptors", limit)?;
        }
        Ok(())
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// The fields of `/proc/self/stat` reported here (proc_pid_stat(5)).
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    user_ticks: u64,
    system_ticks: u64,
    threads: u64,
    /// Since boot, in clock ticks.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

impl Stat {
    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/self/stat").ok()?, rustix::param::page_size() as u64)
    }

    /// Parses the line after the command name, which is in parentheses and may hold
    /// spaces and parentheses itself: the fields start after the last `)`.
    fn parse(line: &str, page_size: u64) -> Option<Self> {
        let (_, after_name) = line.rsplit_once(')')?;
        // Field 3 (state) is the first after the name.
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
        Some(Stat {
            user_ticks: field(14)?,
            system_ticks: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)?.saturating_mul(page_size),
        })
    }
}

/// Unix time of the last boot, the `btime` line of `/proc/stat`.
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|line| line.strip_prefix("btime "))?.trim().parse().ok()
}

/// Open descriptors, not counting the one that lists them.
fn open_descriptors() -> Option<u64> {
    let listed = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(listed.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::Stat;

    #[test]
    fn stat_fields_are_read_after_a_command_name_with_spaces_and_parentheses() {
        // A line as the kernel writes it, the command name changed to hold what would
        // trip a split on spaces or on the first `)`.
        let line = "4242 (llm (proxy) x) S 1 4242 4242 0 -1 4194560 2651 0 0 0 137 58 0 0 20 0 \
                    5 0 88123 1234567168 4321 18446744073709551615 1 1 0 0 0 0 0 4096 1260 0 0 0 \
                    17 1 0 0 0 0 0";
        assert_eq!(
            Stat::parse(line, 4096),
            Some(Stat {
                user_ticks: 137,
                system_ticks: 58,
                threads: 5,
                start_ticks: 88123,
                virtual_bytes: 1_234_567_168,
                resident_bytes: 4321 * 4096,
            })
        );
        assert_eq!(Stat::parse("4242 (cut short) S 1 2", 4096), None);
    }

    #[test]
    fn this_process_reports_every_figure() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(super::ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_threads",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            let value = text.lines().find_map(|line| line.strip_prefix(&format!("{name} ")));
            let value: f64 = value.unwrap_or_else(|| panic!("no {name} in\n{text}")).parse().unwrap();
            assert!(value > 0.0 || name == "process_cpu_seconds_total", "{name} {value}");
        }
    }
}
