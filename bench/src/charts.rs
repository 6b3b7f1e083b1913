//! Charts of the runtime comparison, as PNG and SVG: start latency and pod start bars, the
//! density curve, and one cold start's phases as a stacked bar.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::runtimes::{Figure, Results, Runtime, RUNTIMES};

/// PNG text is drawn with this font (Debian's fonts-dejavu-core); SVG names the family only.
const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (900, 500);
/// The figures shown as start latency bars.
const LATENCY_FIGURES: [&str; 3] =
    [crate::runtimes::COLD_START, crate::runtimes::FIRST_OUTPUT, crate::runtimes::EXEC_LATENCY];
/// The pod figures shown as bars.
const POD_FIGURES: [&str; 2] = ["pod start", "second container start"];
const THROUGHPUT_FIGURE: [&str; 1] = ["bulk transfer from the pod"];
const CONNECT_FIGURE: [&str; 1] = ["TCP connect round trip"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the chart font {path}")]
    Font {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the chart font {0} is not a usable TrueType font")]
    BadFont(PathBuf),
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

fn colour(runtime: Runtime) -> RGBColor {
    match runtime {
        Runtime::Ironclad => RGBColor(0x1f, 0x4e, 0x9c),
        Runtime::Runc => RGBColor(0xe0, 0x8a, 0x1e),
    }
}

/// Makes the font known to the PNG backend (once per process).
pub fn load_font() -> Result<(), Error> {
    let bytes = std::fs::read(FONT_FILE).map_err(|source| Error::Font { path: FONT_FILE.into(), source })?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| Error::BadFont(FONT_FILE.into()))
}

/// A chart that can be drawn on any backend.
trait Chart {
    fn on<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Writes `<stem>.png` and `<stem>.svg` in `dir`; returns their paths.
fn both_formats(dir: &Path, stem: &str, chart: &impl Chart) -> Result<Vec<PathBuf>, Error> {
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |message: String| Error::Draw { path, message }
    };
    {
        let area = BitMapBackend::new(&png, SIZE).into_drawing_area();
        chart.on(&area).and_then(|_| area.present().map_err(|e| e.to_string())).map_err(fail(&png))?;
    }
    {
        let area = SVGBackend::new(&svg, SIZE).into_drawing_area();
        chart.on(&area).and_then(|_| area.present().map_err(|e| e.to_string())).map_err(fail(&svg))?;
    }
    Ok(vec![png, svg])
}

type Frame<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A white chart with a caption and room for axis labels, over `x` by `y`.
fn frame<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Frame<'a, DB>, String> {
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())
}

/// The legend naming each runtime's colour.
fn draw_legend<'a, DB: DrawingBackend + 'a>(chart: &mut Frame<'a, DB>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Median start latency of each runtime, grouped by figure.
pub fn start_latency(results: &Results, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let caption = "Start latency, median (s): ironclad vs runc";
    median_bars(&results.figures, &LATENCY_FIGURES, caption, "seconds", "start-latency", dir)
}

/// Median pod start and second container start of each runtime.
pub fn pod_start(results: &crate::pods::Results, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let caption = "Pods through CRI, median (s): ironclad vs runc";
    median_bars(&results.figures, &POD_FIGURES, caption, "seconds", "pod-start", dir)
}

/// The pod's network, median: throughput of the bulk transfer, and the connect round trip.
pub fn pod_network(results: &crate::pods::Results, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let caption = "Bulk transfer from the pod, median (MiB/s): ironclad vs runc";
    let mut drawn =
        median_bars(&results.figures, &THROUGHPUT_FIGURE, caption, "MiB/s", "network-throughput", dir)?;
    let caption = "TCP connect round trip to the pod, median (ms): ironclad vs runc";
    drawn.extend(median_bars(
        &results.figures,
        &CONNECT_FIGURE,
        caption,
        "milliseconds",
        "network-connect",
        dir,
    )?);
    Ok(drawn)
}

/// One bar per runtime for each of the named figures (all in the unit `y_desc` names), grouped by
/// figure.
fn median_bars(
    figures: &[Figure],
    names: &'static [&'static str],
    caption: &'static str,
    y_desc: &'static str,
    stem: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>, Error> {
    let bars: Vec<(usize, Runtime, f64)> = names
        .iter()
        .enumerate()
        .filter_map(|(i, name)| Some((i, figures.iter().find(|f| f.name == *name)?)))
        .flat_map(|(i, figure)| figure.summaries.iter().map(move |(runtime, s)| (i, *runtime, s.median)))
        .collect();
    let top = bars.iter().map(|b| b.2).fold(0.0, f64::max).max(0.001) * 1.15;
    struct Draw<'a> {
        bars: &'a [(usize, Runtime, f64)],
        top: f64,
        names: &'static [&'static str],
        caption: &'static str,
        y_desc: &'static str,
    }
    impl Chart for Draw<'_> {
        fn on<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
            let names = self.names;
            let mut chart = frame(area, self.caption, 0f64..names.len() as f64, 0f64..self.top)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(names.len() * 2 + 1)
                .x_label_formatter(&|x| {
                    let slot = x - x.floor();
                    if (slot - 0.5).abs() < 0.01 {
                        names.get(x.floor() as usize).map(|s| s.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_desc(self.y_desc)
                .draw()
                .map_err(|e| e.to_string())?;
            for runtime in RUNTIMES {
                let offset = if runtime == Runtime::Ironclad { 0.15 } else { 0.5 };
                let rects = self.bars.iter().filter(|b| b.1 == runtime).map(|&(i, _, value)| {
                    let x = i as f64 + offset;
                    Rectangle::new([(x, 0.0), (x + 0.33, value)], colour(runtime).filled())
                });
                chart.draw_series(rects).map_err(|e| e.to_string())?.label(runtime.name()).legend(
                    move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour(runtime).filled()),
                );
            }
            draw_legend(&mut chart)
        }
    }
    both_formats(dir, stem, &Draw { bars: &bars, top, names, caption, y_desc })
}

/// Time to start N sandboxes at once, per runtime.
pub fn density(results: &Results, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let points = &results.density;
    let max_n = points.iter().map(|p| p.sandboxes).max().unwrap_or(1) as f64;
    let max_s = points.iter().map(|p| p.start_all_s).fold(0.0, f64::max).max(0.001) * 1.15;
    struct Draw<'a>(&'a [crate::runtimes::DensityPoint], f64, f64);
    impl Chart for Draw<'_> {
        fn on<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
            let (points, max_n, max_s) = (self.0, self.1, self.2);
            let mut chart = frame(
                area,
                "Density: time to start N sandboxes at once (s)",
                0f64..max_n * 1.05,
                0f64..max_s,
            )?;
            chart.configure_mesh().x_desc("sandboxes").y_desc("seconds").draw().map_err(|e| e.to_string())?;
            for runtime in RUNTIMES {
                let series: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| p.runtime == runtime)
                    .map(|p| (p.sandboxes as f64, p.start_all_s))
                    .collect();
                let style = colour(runtime).stroke_width(3);
                chart
                    .draw_series(LineSeries::new(series.clone(), style))
                    .map_err(|e| e.to_string())?
                    .label(runtime.name())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 15, y)], colour(runtime).stroke_width(3))
                    });
                chart
                    .draw_series(
                        series.iter().map(|&(x, y)| Circle::new((x, y), 4, colour(runtime).filled())),
                    )
                    .map_err(|e| e.to_string())?;
            }
            draw_legend(&mut chart)
        }
    }
    both_formats(dir, "density", &Draw(points, max_n, max_s))
}

/// The phases' colours, in order (a qualitative palette; the 12 phases take one each).
const PHASE_COLOURS: [RGBColor; 12] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x39, 0x3b, 0x79),
    RGBColor(0xad, 0x49, 0x4a),
];

/// One ironclad cold start as a stacked bar: each phase's median, end to end.
pub fn start_timeline(phases: &[crate::timeline::Phase], dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let bars: Vec<(String, f64)> = phases.iter().map(|p| (p.name.to_string(), p.median_ms)).collect();
    let chart = StackedBar {
        caption: "Where an ironclad cold start goes, median per phase (ms)",
        axis: "milliseconds from `ctr run`",
        unit: "ms",
        decimals: 0,
        bars: &bars,
    };
    both_formats(dir, "start-timeline", &chart)
}

pub fn idle_memory(parts: &[(crate::memory::Part, f64)], dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let bars: Vec<(String, f64)> = parts.iter().map(|(part, mib)| (part.label().to_string(), *mib)).collect();
    let chart = StackedBar {
        caption: "Where an idle ironclad sandbox's host memory goes (PSS, MiB)",
        axis: "MiB",
        unit: "MiB",
        decimals: 1,
        bars: &bars,
    };
    both_formats(dir, "idle-memory", &chart)
}

/// One horizontal bar cut into labelled pieces, one after the other.
struct StackedBar<'a> {
    caption: &'a str,
    axis: &'a str,
    unit: &'a str,
    decimals: usize,
    bars: &'a [(String, f64)],
}

impl Chart for StackedBar<'_> {
    fn on<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let total = self.bars.iter().map(|(_, v)| v).sum::<f64>().max(1.0);
        let mut chart = frame(area, self.caption, 0f64..total * 1.02, 0f64..1.0)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc(self.axis)
            .draw()
            .map_err(|e| e.to_string())?;
        let mut from = 0.0;
        for ((name, value), colour) in self.bars.iter().zip(PHASE_COLOURS.iter().cycle()) {
            let to = from + value;
            let bar = Rectangle::new([(from, 0.82), (to, 0.97)], colour.filled());
            let label = format!("{name} ({value:.prec$} {})", self.unit, prec = self.decimals);
            let colour = *colour;
            chart
                .draw_series(std::iter::once(bar))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
            from = to;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    }
}
