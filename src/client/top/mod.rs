//! `reactor top`: a live view of a running server, from its metrics
//! endpoint.
//!
//! Every interval it scrapes `GET /metrics` ([`scrape`]), turns the
//! difference from the previous scrape into rates ([`view::rates`]), and
//! draws them with ratatui ([`view::draw`]): connections and their rate,
//! reads/s (msgs/s in ping-pong), bytes/s, how busy the loop is, how many events each wake-up
//! brings (as a small histogram), back-pressure, and one row per worker.
//! The endpoint is the only source: `top` works against any reactor
//! started with `--metrics`, local or not.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

pub mod scrape;
pub mod view;

use view::Screen;

/// What `reactor top` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The metrics endpoint (`HOST:PORT` of `--metrics`).
    pub addr: SocketAddr,
    /// Time between scrapes.
    pub interval: Duration,
    /// Print one screen (two scrapes, one interval apart) as text and exit.
    pub once: bool,
}

/// Runs `top` until `q`, Esc or Ctrl-C (or, with `once`, for one screen).
pub fn run(options: &Options) -> ExitCode {
    if options.once {
        return once(options);
    }
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("reactor top: cannot use this terminal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = live(&mut terminal, options);
    ratatui::restore();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reactor top: {e}");
            ExitCode::FAILURE
        }
    }
}

fn live(terminal: &mut ratatui::DefaultTerminal, options: &Options) -> std::io::Result<()> {
    let source = options.addr.to_string();
    let mut previous = None;
    let mut screen = Screen {
        source: source.clone(),
        ..Screen::default()
    };
    loop {
        match scrape::scrape(options.addr) {
            Ok(now) => {
                if let Some(before) = &previous {
                    screen = Screen::between(&source, before, &now);
                } else {
                    screen.error = None;
                }
                previous = Some(now);
            }
            Err(e) => screen.error = Some(e),
        }
        terminal.draw(|f| view::draw(f, &screen))?;
        // Wait out the interval, answering keys (and resizes) at once.
        let next = Instant::now() + options.interval;
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            match event::read()? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => {
                    terminal.draw(|f| view::draw(f, &screen))?;
                }
                _ => {}
            }
        }
    }
}

fn once(options: &Options) -> ExitCode {
    let first = scrape::scrape(options.addr);
    std::thread::sleep(options.interval);
    let second = scrape::scrape(options.addr);
    match (first, second) {
        (Ok(a), Ok(b)) => {
            let screen = Screen::between(&options.addr.to_string(), &a, &b);
            print!("{}", view::to_text(&screen, 100, 28));
            ExitCode::SUCCESS
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("reactor top: {e}");
            ExitCode::FAILURE
        }
    }
}
