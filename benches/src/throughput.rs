//! The report of `scripts/bench-throughput`: it reads the runs the script recorded (one line
//! per iperf3 run: round, tunnel, test, figures), prints the medians per tunnel and test with
//! their ratios to the raw link, and writes them as CSV and the rounds as an SVG chart. Kept
//! out of the shell script so the arithmetic is tested and the chart drawn by a library.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;

/// One iperf3 run, as the script records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Which round (1-based): every tunnel runs every test once per round.
    pub round: u32,
    /// The tunnel: `raw`, `warren`, `warren-derp`, `wireguard-go`, ...
    pub tunnel: String,
    /// `tcp` (one stream), `tcp4` (four parallel streams) or `udp` (a flood).
    pub test: String,
    /// Received Gbit/s.
    pub gbps: f64,
    /// Received packets per second (UDP; 0 for TCP).
    pub pps: f64,
    /// CPU-seconds of the tunnel's processes over the run (0 for the raw link).
    pub cpu_s: f64,
    /// Gbit received.
    pub gbit: f64,
    /// TCP retransmits the sender counted.
    pub retransmits: u64,
    /// Tunnel packets received (TCP: bytes over the MSS the tunnel MTU allows).
    pub packets: u64,
    /// CPU-seconds of the sending end's tunnel process.
    pub tx_cpu_s: f64,
    /// CPU-seconds of the receiving end's tunnel process.
    pub rx_cpu_s: f64,
}

impl Run {
    /// Nanoseconds of the sending end's CPU per packet; `None` without CPU (raw).
    pub fn tx_ns_per_packet(&self) -> Option<f64> {
        (self.tx_cpu_s > 0.0 && self.packets > 0).then(|| self.tx_cpu_s * 1e9 / self.packets as f64)
    }

    /// Nanoseconds of the receiving end's CPU per packet.
    pub fn rx_ns_per_packet(&self) -> Option<f64> {
        (self.rx_cpu_s > 0.0 && self.packets > 0).then(|| self.rx_cpu_s * 1e9 / self.packets as f64)
    }

    /// Gbit carried per CPU-second of the tunnel's processes; `None` without CPU (raw).
    pub fn gbit_per_cpu_s(&self) -> Option<f64> {
        (self.cpu_s > 0.0).then(|| self.gbit / self.cpu_s)
    }
}

/// Parses the script's tab-separated lines: round, tunnel, test, Gbit/s, packets/s,
/// CPU-seconds, Gbit, retransmits, packets, sender CPU-seconds, receiver CPU-seconds.
pub fn parse(text: &str) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        let [
            round,
            tunnel,
            test,
            gbps,
            pps,
            cpu_s,
            gbit,
            retransmits,
            packets,
            tx_cpu_s,
            rx_cpu_s,
        ] = f[..]
        else {
            bail!("line {}: {} fields, want 11: {line:?}", i + 1, f.len());
        };
        let num = |s: &str, what: &str| -> anyhow::Result<f64> {
            s.parse::<f64>()
                .with_context(|| format!("line {}: {what} {s:?}", i + 1))
        };
        runs.push(Run {
            round: round
                .parse()
                .with_context(|| format!("line {}: round {round:?}", i + 1))?,
            tunnel: tunnel.to_string(),
            test: test.to_string(),
            gbps: num(gbps, "Gbit/s")?,
            pps: num(pps, "packets/s")?,
            cpu_s: num(cpu_s, "CPU-seconds")?,
            gbit: num(gbit, "Gbit")?,
            retransmits: if retransmits.is_empty() {
                0
            } else {
                retransmits
                    .parse()
                    .with_context(|| format!("line {}: retransmits {retransmits:?}", i + 1))?
            },
            packets: packets
                .parse()
                .with_context(|| format!("line {}: packets {packets:?}", i + 1))?,
            tx_cpu_s: num(tx_cpu_s, "sender CPU-seconds")?,
            rx_cpu_s: num(rx_cpu_s, "receiver CPU-seconds")?,
        });
    }
    Ok(runs)
}

/// The median of the rounds of one tunnel and test.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The tunnel.
    pub tunnel: String,
    /// The test.
    pub test: String,
    /// Rounds measured.
    pub rounds: usize,
    /// Median received Gbit/s.
    pub gbps: f64,
    /// Median Gbit/s as a share of the raw link's in the same test.
    pub of_raw: Option<f64>,
    /// Median Gbit per CPU-second.
    pub gbit_per_cpu_s: Option<f64>,
    /// Median received packets/s.
    pub pps: f64,
    /// Median retransmits per run.
    pub retransmits: f64,
    /// Median nanoseconds of the sending end's CPU per packet.
    pub tx_ns_per_packet: Option<f64>,
    /// Median nanoseconds of the receiving end's CPU per packet.
    pub rx_ns_per_packet: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Tunnels in the order they were first measured, tests in a fixed order.
fn order(runs: &[Run]) -> (Vec<String>, Vec<String>) {
    let mut tunnels: Vec<String> = Vec::new();
    for r in runs {
        if !tunnels.contains(&r.tunnel) {
            tunnels.push(r.tunnel.clone());
        }
    }
    let tests = ["tcp", "tcp4", "udp"]
        .into_iter()
        .filter(|t| runs.iter().any(|r| r.test == *t))
        .map(String::from)
        .collect();
    (tunnels, tests)
}

/// Medians per tunnel and test.
pub fn summarize(runs: &[Run]) -> Vec<Summary> {
    let mut groups: BTreeMap<(&str, &str), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        groups.entry((&r.tunnel, &r.test)).or_default().push(r);
    }
    let (tunnels, tests) = order(runs);
    let mut out = Vec::new();
    for test in &tests {
        let raw = groups
            .get(&("raw", test.as_str()))
            .map(|g| median(g.iter().map(|r| r.gbps).collect()));
        for tunnel in &tunnels {
            let Some(g) = groups.get(&(tunnel.as_str(), test.as_str())) else {
                continue;
            };
            let gbps = median(g.iter().map(|r| r.gbps).collect());
            let med = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
            let per_cpu: Vec<f64> = g.iter().filter_map(|r| r.gbit_per_cpu_s()).collect();
            out.push(Summary {
                tunnel: tunnel.clone(),
                test: test.clone(),
                rounds: g.len(),
                gbps,
                of_raw: raw
                    .filter(|r| *r > 0.0 && tunnel != "raw")
                    .map(|r| gbps / r),
                gbit_per_cpu_s: med(per_cpu),
                tx_ns_per_packet: med(g.iter().filter_map(|r| r.tx_ns_per_packet()).collect()),
                rx_ns_per_packet: med(g.iter().filter_map(|r| r.rx_ns_per_packet()).collect()),
                pps: median(g.iter().map(|r| r.pps).collect()),
                retransmits: median(g.iter().map(|r| r.retransmits as f64).collect()),
            });
        }
    }
    out
}

/// The medians as a table for the terminal.
pub fn table(summaries: &[Summary]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<14} {:<5} {:>6} {:>9} {:>8} {:>11} {:>12} {:>12} {:>10} {:>10}",
        "tunnel",
        "test",
        "rounds",
        "Gbit/s",
        "of raw",
        "Gbit/CPU-s",
        "packets/s",
        "retransmits",
        "tx ns/pkt",
        "rx ns/pkt"
    );
    for x in summaries {
        let of_raw = x
            .of_raw
            .map_or("-".to_string(), |r| format!("{:.1}%", 100.0 * r));
        let per_cpu = x
            .gbit_per_cpu_s
            .map_or("-".to_string(), |v| format!("{v:.3}"));
        let pps = if x.test == "udp" {
            format!("{:.0}", x.pps)
        } else {
            "-".to_string()
        };
        let retr = if x.test == "udp" {
            "-".to_string()
        } else {
            format!("{:.0}", x.retransmits)
        };
        let ns = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let _ = writeln!(
            s,
            "{:<14} {:<5} {:>6} {:>9.3} {:>8} {:>11} {:>12} {:>12} {:>10} {:>10}",
            x.tunnel,
            x.test,
            x.rounds,
            x.gbps,
            of_raw,
            per_cpu,
            pps,
            retr,
            ns(x.tx_ns_per_packet),
            ns(x.rx_ns_per_packet)
        );
    }
    s
}

/// Every run and then every median, as CSV (one header; `kind` tells them apart).
pub fn csv(runs: &[Run], summaries: &[Summary]) -> String {
    let mut s = String::from(
        "kind,round,tunnel,test,gbit_per_s,of_raw,gbit_per_cpu_s,packets_per_s,cpu_s,retransmits,\
         tx_ns_per_packet,rx_ns_per_packet\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    for r in runs {
        let _ = writeln!(
            s,
            "run,{},{},{},{:.4},,{},{:.0},{:.2},{},{},{}",
            r.round,
            r.tunnel,
            r.test,
            r.gbps,
            opt(r.gbit_per_cpu_s()),
            r.pps,
            r.cpu_s,
            r.retransmits,
            opt(r.tx_ns_per_packet()),
            opt(r.rx_ns_per_packet())
        );
    }
    for x in summaries {
        let _ = writeln!(
            s,
            "median,,{},{},{:.4},{},{},{:.0},,{:.0},{},{}",
            x.tunnel,
            x.test,
            x.gbps,
            opt(x.of_raw),
            opt(x.gbit_per_cpu_s),
            x.pps,
            x.retransmits,
            opt(x.tx_ns_per_packet),
            opt(x.rx_ns_per_packet)
        );
    }
    s
}

/// An SVG chart of the rounds: one panel per test, Gbit/s per round, one line per tunnel.
pub fn chart(runs: &[Run], path: &Path) -> anyhow::Result<()> {
    let (tunnels, tests) = order(runs);
    if tests.is_empty() {
        bail!("no runs to draw");
    }
    let rounds = runs.iter().map(|r| r.round).max().unwrap_or(1);
    let height = 360 * u32::try_from(tests.len()).unwrap_or(1);
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((tests.len(), 1));
    for (panel, test) in panels.iter().zip(&tests) {
        let top = runs
            .iter()
            .filter(|r| &r.test == test)
            .map(|r| r.gbps)
            .fold(0.0, f64::max)
            * 1.1;
        let title = match test.as_str() {
            "tcp" => "TCP, one stream: Gbit/s received per round",
            "tcp4" => "TCP, four streams: Gbit/s received per round",
            _ => "UDP flood: Gbit/s received per round",
        };
        let mut c = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.5f64..f64::from(rounds) + 0.5, 0f64..top.max(0.1))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        c.configure_mesh()
            .x_desc("round")
            .y_desc("Gbit/s")
            .x_labels(rounds as usize)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, tunnel) in tunnels.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| &r.test == test && &r.tunnel == tunnel)
                .map(|r| (f64::from(r.round), r.gbps))
                .collect();
            if pts.is_empty() {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(tunnel.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "1\traw\ttcp\t10.0\t0\t0\t100\t5\t1000\t0\t0\n\
        1\twarren\ttcp\t4.0\t0\t8.0\t40\t0\t1000000\t4.0\t4.0\n\
        2\traw\ttcp\t12.0\t0\t0\t120\t7\t1000\t0\t0\n\
        2\twarren\ttcp\t5.0\t0\t10.0\t50\t2\t1000000\t3.0\t6.0\n\
        3\traw\ttcp\t11.0\t0\t0\t110\t\t1000\t0\t0\n\
        3\twarren\ttcp\t6.0\t0\t10.0\t60\t1\t2000000\t5.0\t5.0\n\
        1\twarren\tudp\t2.0\t190000\t5.0\t20\t\t950000\t2.5\t2.5\n";

    #[test]
    fn medians_and_ratios_to_raw_in_the_same_test() {
        let runs = parse(SAMPLE).expect("parse");
        assert_eq!(runs.len(), 7);
        let s = summarize(&runs);
        let w = s
            .iter()
            .find(|x| x.tunnel == "warren" && x.test == "tcp")
            .expect("warren tcp");
        assert_eq!(w.rounds, 3);
        assert_eq!(w.gbps, 5.0);
        assert_eq!(w.of_raw, Some(5.0 / 11.0));
        assert_eq!(w.gbit_per_cpu_s, Some(5.0));
        assert_eq!(w.retransmits, 1.0);
        // Per packet: 4000, 3000 and 2500 ns sending; 4000, 6000 and 2500 receiving.
        assert_eq!(w.tx_ns_per_packet, Some(3000.0));
        assert_eq!(w.rx_ns_per_packet, Some(4000.0));
        let raw = s.iter().find(|x| x.tunnel == "raw").expect("raw");
        assert_eq!((raw.of_raw, raw.gbit_per_cpu_s), (None, None));
        let udp = s.iter().find(|x| x.test == "udp").expect("udp");
        assert_eq!((udp.pps, udp.of_raw), (190_000.0, None));
        let t = table(&s);
        assert!(t.contains("45.5%"), "{t}");
        let c = csv(&runs, &s);
        assert_eq!(c.lines().count(), 1 + 7 + s.len());
        assert!(
            c.contains("median,,warren,tcp,5.0000,0.4545,5.0000,0,,1,3000.0000,4000.0000"),
            "{c}"
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = parse("1\traw\ttcp\tfast\t0\t0\t1\t0\t1\t0\t0\n").expect_err("bad number");
        assert_eq!(
            format!("{e:#}"),
            "line 1: Gbit/s \"fast\": invalid float literal"
        );
        let e = parse("1\traw\n").expect_err("short line");
        assert_eq!(e.to_string(), "line 1: 2 fields, want 11: \"1\\traw\"");
    }

    #[test]
    fn chart_is_an_svg_with_every_tunnel() {
        let runs = parse(SAMPLE).expect("parse");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chart.svg");
        chart(&runs, &path).expect("chart");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for text in ["raw", "warren", "UDP flood", "TCP, one stream"] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
    }
}
