//! The figures a run collects and the table it prints: each figure with its value, its aim and
//! whether the aim is met, so a reader of the README sees at once where Lichen stands.

use std::fmt::Write as _;

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// The section it belongs to.
    pub section: &'static str,
    /// What was measured, as a reader would name it.
    pub what: String,
    /// The value with its unit, or why it could not be measured.
    pub value: String,
    /// The aim, empty when the figure is context for another.
    pub aim: String,
    /// Whether the aim is met; `None` when there is no aim or no value.
    pub met: Option<bool>,
}

/// Everything a run measured, and whether any section failed to measure.
#[derive(Debug, Default)]
pub struct Report {
    figures: Vec<Figure>,
    failures: Vec<String>,
}

impl Report {
    /// A figure with an aim it is compared against (`met`).
    pub fn aim(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        value: String,
        aim: &str,
        met: bool,
    ) {
        let what = what.into();
        println!("{section}: {what}: {value} (aim {aim}: {})", if met { "met" } else { "NOT met" });
        self.figures.push(Figure { section, what, value, aim: aim.to_owned(), met: Some(met) });
    }

    /// A figure without an aim (context for the others).
    pub fn info(&mut self, section: &'static str, what: impl Into<String>, value: String) {
        let what = what.into();
        println!("{section}: {what}: {value}");
        self.figures.push(Figure { section, what, value, aim: String::new(), met: None });
    }

    /// A section that could not measure (a daemon missing, a step that never happened): printed,
    /// and the run exits non-zero.
    pub fn failed(&mut self, section: &'static str, why: impl Into<String>) {
        let why = why.into();
        eprintln!("{section}: NOT MEASURED: {why}");
        self.failures.push(format!("{section}: {why}"));
    }

    /// A section skipped on purpose (its prerequisite is not configured), shown in the table.
    pub fn skipped(&mut self, section: &'static str, why: impl Into<String>) {
        let why = why.into();
        println!("{section}: skipped: {why}");
        self.figures.push(Figure {
            section,
            what: "(skipped)".into(),
            value: why,
            aim: String::new(),
            met: None,
        });
    }

    /// Prints the Markdown table.
    pub fn print(&self) {
        let mut out = String::from("\n| section | figure | value | aim | met |\n|---|---|---|---|---|\n");
        for f in &self.figures {
            let met = match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(out, "| {} | {} | {} | {} | {} |", f.section, f.what, f.value, f.aim, met);
        }
        print!("{out}");
        for f in &self.failures {
            println!("not measured: {f}");
        }
    }

    /// Non-zero when a section could not measure.
    pub fn exit_code(&self) -> std::process::ExitCode {
        if self.failures.is_empty() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }
}
