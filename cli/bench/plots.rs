//! The comparison's figures as SVG (plotters): throughput against clients per system,
//! and each request's latency against time across a leader kill. Each is headed with
//! the date, the machine and the exact command that measured it.

use std::path::Path;

use plotters::prelude::*;

/// What heads every plot: when, where and how it was measured.
#[derive(Debug, Clone)]
pub struct Caption {
    pub date: String,
    /// "2 cores, AMD EPYC".
    pub machine: String,
    pub command: String,
}

impl Caption {
    pub fn of_this_run() -> Self {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpu_model(&cpuinfo).unwrap_or("unknown CPU");
        let args: Vec<String> = std::env::args().skip(1).map(|a| shell_word(&a)).collect();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            date: utc_date(now),
            machine: format!("{cores} cores, {model}"),
            command: format!("tandem {}", args.join(" ")),
        }
    }
}

/// A named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(127, 127, 127)];

const SIZE: (u32, u32) = (960, 600);

/// Throughput (ops/s) against clients, a line per series.
pub fn throughput(path: &Path, caption: &Caption, series: &[Series]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let title = "Throughput against concurrent clients (unique-key 100-byte puts)";
    let body = head(&root, title, caption, &legend_of(series, &COLORS))?;
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = all().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&body)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("acknowledged requests per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot_error)?;
    for (s, color) in series.iter().zip(COLORS.iter().cycle()) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(plot_error)?;
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Latency (ms, log scale) of each request against its completion time (s since the
/// kill), a colour per series; the slowest request of each 10 ms.
pub fn failover(path: &Path, caption: &Caption, series: &[Series]) -> anyhow::Result<()> {
    // Tandem in the throughput plot's blue, etcd in its red.
    let colors = [COLORS[0], COLORS[2]];
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let title = "Latency of each write across a kill -9 of the leader (at 0 s)";
    let body = head(&root, title, caption, &legend_of(series, &colors))?;
    let binned: Vec<Vec<(f64, f64)>> = series.iter().map(|s| slowest_per_bin(&s.points, 0.01)).collect();
    let all = || binned.iter().flatten();
    let x_min = all().map(|p| p.0).fold(-0.5, f64::min);
    let x_max = all().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let y_min = all().map(|p| p.1).fold(y_max, f64::min).clamp(0.01, 1.0) / 2.0;
    let mut chart = ChartBuilder::on(&body)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, (y_min..y_max).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the kill (completion time of the request)")
        .y_desc("latency, ms (log scale)")
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(plot_error)?;
    chart.draw_series(LineSeries::new([(0.0, y_min), (0.0, y_max)], BLACK.mix(0.4))).map_err(plot_error)?;
    for (points, color) in binned.iter().zip(colors.iter().cycle()) {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 2, color.filled()))).map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Each series' name and colour.
fn legend_of(series: &[Series], colors: &[RGBColor]) -> Vec<(String, RGBColor)> {
    series.iter().zip(colors.iter().cycle()).map(|(s, c)| (s.name.clone(), *c)).collect()
}

/// Writes the title, the caption's lines and the legend at the top (above the chart,
/// where no point can hide under it); returns the area below.
fn head<'a>(
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    title: &str,
    caption: &Caption,
    legend: &[(String, RGBColor)],
) -> anyhow::Result<DrawingArea<SVGBackend<'a>, plotters::coord::Shift>> {
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, body) = root.split_vertically(104);
    let lines = [
        (title.to_owned(), 20),
        (format!("{} · {}", caption.date, caption.machine), 14),
        (caption.command.clone(), 13),
    ];
    let mut y = 8;
    for (text, size) in lines {
        top.draw(&Text::new(text, (12, y), ("sans-serif", size).into_font())).map_err(plot_error)?;
        y += size + 8;
    }
    let mut x = 12;
    for (name, color) in legend {
        top.draw(&Rectangle::new([(x, y + 3), (x + 18, y + 9)], color.filled())).map_err(plot_error)?;
        top.draw(&Text::new(name.clone(), (x + 24, y), ("sans-serif", 13).into_font()))
            .map_err(plot_error)?;
        x += 40 + 7 * name.len() as i32;
    }
    Ok(body)
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the plot: {error}")
}

/// The slowest point of each `width`-wide bin of x, in order of x: a plot of a long
/// run that keeps its outliers and stays small.
fn slowest_per_bin(points: &[(f64, f64)], width: f64) -> Vec<(f64, f64)> {
    let mut bins: std::collections::BTreeMap<i64, (f64, f64)> = std::collections::BTreeMap::new();
    for &(x, y) in points {
        let bin = bins.entry((x / width).floor() as i64).or_insert((x, y));
        if y > bin.1 {
            *bin = (x, y);
        }
    }
    bins.into_values().collect()
}

/// The first "model name" of a /proc/cpuinfo text.
fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim())
}

/// `word`, quoted for a shell when it needs to be.
fn shell_word(word: &str) -> String {
    let plain =
        !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./,=:@%+".contains(c));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// YYYY-MM-DD (UTC) of a unix time in seconds.
fn utc_date(unix_secs: u64) -> String {
    // Days to civil date (H. Hinnant's algorithm), for days since 1970-01-01.
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_764_374_400), "2025-11-29");
        assert_eq!(utc_date(1_709_251_199), "2024-02-29", "a leap day, its last second");
    }

    #[test]
    fn the_cpu_model_is_the_first_model_name() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor\t: 0\n"), None);
    }

    #[test]
    fn command_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("--clients"), "--clients");
        assert_eq!(shell_word("1,32,64"), "1,32,64");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn each_bin_keeps_its_slowest_point() {
        let points = [(0.001, 1.0), (0.004, 9.0), (0.012, 2.0), (-0.003, 5.0)];
        assert_eq!(slowest_per_bin(&points, 0.01), vec![(-0.003, 5.0), (0.004, 9.0), (0.012, 2.0)]);
    }

    #[test]
    fn plots_are_written_as_svg() {
        let dir = tempfile::tempdir().expect("temp dir");
        let caption = Caption {
            date: "2025-11-29".into(),
            machine: "2 cores, test".into(),
            command: "tandem bench compare".into(),
        };
        let rates = [
            Series { name: "a".into(), points: vec![(1.0, 100.0), (32.0, 900.0)] },
            Series { name: "b".into(), points: vec![(1.0, 80.0), (32.0, 400.0)] },
        ];
        throughput(&dir.path().join("t.svg"), &caption, &rates).expect("throughput plot");
        let around = [Series { name: "a".into(), points: vec![(-0.5, 0.4), (0.2, 200.0), (0.25, 0.5)] }];
        failover(&dir.path().join("f.svg"), &caption, &around).expect("failover plot");
        for name in ["t.svg", "f.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(name)).expect("written");
            assert!(
                svg.starts_with("<svg") && svg.contains("2025-11-29"),
                "{name}: {}",
                &svg[..100.min(svg.len())]
            );
        }
    }
}
