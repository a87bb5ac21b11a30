//! The build view of `lambda-imagectl build`: JSON Lines, plain lines, or on a TTY the
//! engine's output scrolling above one live status line.

use std::io::IsTerminal;

use bytesize::ByteSize;

use lambda_imaged::client::proto;
use proto::build_event::Event;

use crate::print_json;

/// Renders build events: JSON Lines, plain lines, or on a TTY engine output scrolling above a
/// live status line (elapsed time, build step, bytes of context sent; `indicatif`).
pub struct Render {
    json: bool,
    quiet: bool,
    /// The live status line, on a TTY only.
    bar: Option<indicatif::ProgressBar>,
    step: String,
    transfer: String,
}

impl Render {
    /// A renderer: `json` prints one JSON object per event, `quiet` only the outcome.
    pub fn new(json: bool, quiet: bool) -> Render {
        let bar = (!json && !quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            let style = indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Render {
            json,
            quiet,
            bar,
            step: String::new(),
            transfer: String::new(),
        }
    }

    /// A line of output: above the status line on a TTY, else on stderr.
    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn status(&self) {
        if let Some(bar) = &self.bar {
            let parts: Vec<&str> = [self.step.as_str(), self.transfer.as_str()]
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect();
            bar.set_message(parts.join(" · "));
        }
    }

    /// Shows one event of the build.
    pub fn event(&mut self, event: &proto::BuildEvent) {
        let Some(kind) = &event.event else { return };
        if self.json {
            print_json(event);
            return;
        }
        match kind {
            Event::Completed(done) => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                let why = match (proto::reason_name(done.reason), done.changed_layer.as_str()) {
                    (reason, "") => reason.to_owned(),
                    (reason, layer) => format!("{reason}: {layer}"),
                };
                if done.cached {
                    println!("{} is up to date ({})", done.tag, short_id(&done.image_id));
                } else if done.reason == proto::Reason::RegistryHit as i32 {
                    println!(
                        "pulled {} ({}) from the registry cache in {:.1} s, because {why}",
                        done.tag,
                        short_id(&done.image_id),
                        done.duration_ms as f64 / 1000.0
                    );
                } else {
                    println!(
                        "built {} ({}) in {:.1} s, because {why}",
                        done.tag,
                        short_id(&done.image_id),
                        done.duration_ms as f64 / 1000.0
                    );
                }
            }
            _ if self.quiet => {}
            Event::Accepted(accepted) => {
                let how = if accepted.joined {
                    "joined the build in progress"
                } else {
                    "accepted"
                };
                self.line(format!("{} {how} (build {})", accepted.tag, event.build_id));
            }
            Event::Queued(queued) => {
                self.step = format!("queued at position {}", queued.position);
                self.line(format!(
                    "queued: position {} waiting for a build slot",
                    queued.position
                ));
                self.status();
            }
            Event::Log(log) => {
                if log.step > 0 {
                    self.step = format!("step {}", log.step);
                }
                self.line(format!("  {}", shorten(&log.text, 160)));
                self.status();
            }
            Event::PullProgress(pull) => {
                self.transfer = format!(
                    "pulling {}: {}/{}",
                    pull.image,
                    ByteSize(pull.current).display().iec(),
                    ByteSize(pull.total).display().iec()
                );
                self.status();
            }
            Event::ContextProgress(progress) => {
                self.transfer = format!(
                    "context {} sent",
                    ByteSize(progress.bytes_sent).display().iec()
                );
                if progress.bytes_total > 0 {
                    self.line(format!(
                        "context: {} sent",
                        ByteSize(progress.bytes_sent).display().iec()
                    ));
                }
                self.status();
            }
            Event::Warning(warning) => {
                self.line(format!("warning [{}]: {}", warning.code, warning.message))
            }
        }
    }
}

impl Drop for Render {
    fn drop(&mut self) {
        // A failed build ends here: clear the status line before the error is printed.
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// At most `max` characters (engine lines such as our LABEL step can be very long).
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The first 12 hex digits of an image id, as `docker images` shows it.
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}
