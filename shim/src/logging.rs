//! The shim's log: containerd-shim's fifo logger (containerd copies the fifo into its own log),
//! with the task's id on every line. containerd adds the id to its own lines only; with many shims
//! writing at once, an operator (or a failed test) finds one task's lines by `id="<task>"`.

use containerd_shim::logger::FifoLogger;
use log::kv::{Error as KvError, Key, Source, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

/// containerd-shim's variable for a level that overrides the config's.
const LOG_ENV: &str = "RUST_LOG";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the shim's log fifo")]
    Open(#[source] std::io::Error),
    #[error("a logger is already installed")]
    AlreadySet(#[from] log::SetLoggerError),
}

/// Writes through `inner`, adding `id="<task>"` ahead of each record's own fields.
pub struct TaskLogger<L> {
    inner: L,
    id: String,
}

impl<L: Log> TaskLogger<L> {
    pub fn new(inner: L, id: &str) -> Self {
        TaskLogger { inner, id: id.to_string() }
    }
}

impl<L: Log> Log for TaskLogger<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        let fields = WithId { id: &self.id, rest: record.key_values() };
        self.inner.log(
            &Record::builder()
                .args(*record.args())
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .key_values(&fields)
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

struct WithId<'a> {
    id: &'a str,
    rest: &'a dyn Source,
}

impl Source for WithId<'_> {
    fn visit<'kvs>(&'kvs self, visitor: &mut dyn VisitSource<'kvs>) -> Result<(), KvError> {
        visitor.visit_pair(Key::from_str("id"), Value::from(self.id))?;
        self.rest.visit(visitor)
    }
}

/// What containerd-shim's own set-up does (its fifo, `RUST_LOG` over the configured level, debug
/// when containerd runs with it), with the task's id on every line.
pub fn init(debug: bool, default_level: &str, namespace: &str, id: &str) -> Result<(), Error> {
    let fifo = FifoLogger::new(namespace, id).map_err(Error::Open)?;
    log::set_boxed_logger(Box::new(TaskLogger::new(fifo, id)))?;
    log::set_max_level(level(debug, std::env::var(LOG_ENV).ok().as_deref(), default_level));
    Ok(())
}

/// A panic goes to the log: containerd gives the serving shim no stderr, and a panic in one of its
/// tasks would otherwise end that task without a word.
pub fn log_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        log::error!("the shim {}", one_line(&info.to_string()));
        default_hook(info);
    }));
}

/// `text` on one log line: containerd's log is a line per record.
fn one_line(text: &str) -> String {
    text.split('\n').map(str::trim).filter(|part| !part.is_empty()).collect::<Vec<_>>().join(" ")
}

fn level(debug: bool, from_env: Option<&str>, default_level: &str) -> LevelFilter {
    let configured = from_env.unwrap_or(default_level).parse().unwrap_or(LevelFilter::Info);
    if debug {
        configured.max(LevelFilter::Debug)
    } else {
        configured
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Keeps each record's fields as `key=value` words.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Log for Recorder {
        fn enabled(&self, _metadata: &Metadata) -> bool {
            true
        }

        fn log(&self, record: &Record) {
            struct Words(Vec<String>);
            impl<'kvs> VisitSource<'kvs> for Words {
                fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), KvError> {
                    self.0.push(format!("{key}={value}"));
                    Ok(())
                }
            }
            let mut words = Words(Vec::new());
            record.key_values().visit(&mut words).unwrap();
            words.0.push(format!("msg={}", record.args()));
            self.0.lock().unwrap().push(words.0.join(" "));
        }

        fn flush(&self) {}
    }

    #[test]
    fn every_record_carries_the_task_id_ahead_of_its_own_fields() {
        let logger = TaskLogger::new(Recorder::default(), "order118");
        let own = [("exec", "e1")];
        logger.log(&Record::builder().args(format_args!("created")).key_values(&own).build());
        logger.log(&Record::builder().args(format_args!("deleted")).build());
        assert_eq!(
            *logger.inner.0.lock().unwrap(),
            ["id=order118 exec=e1 msg=created", "id=order118 msg=deleted"]
        );
    }

    #[test]
    fn a_panic_message_becomes_one_line() {
        assert_eq!(one_line("panicked at src/x.rs:1:2:\nboom\n"), "panicked at src/x.rs:1:2: boom");
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn the_environment_overrides_the_config_and_debug_raises_it() {
        assert_eq!(level(false, None, "warn"), LevelFilter::Warn);
        assert_eq!(level(false, Some("trace"), "warn"), LevelFilter::Trace);
        assert_eq!(level(true, None, "warn"), LevelFilter::Debug);
        assert_eq!(level(true, Some("trace"), "warn"), LevelFilter::Trace);
        assert_eq!(level(false, None, "nonsense"), LevelFilter::Info);
    }
}
