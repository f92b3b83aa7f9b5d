//! Child processes of a test that never outlive it, and reading their first words.

use std::time::Duration;

/// Child processes killed when dropped, so a failing test leaves nothing behind.
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads `from` line by line on a thread of its own (to its end, so the writer never blocks on
/// a full pipe) and returns the first line `want` accepts, trimmed; `None` if the stream ends
/// first or no such line comes within `within`.
pub fn first_line(
    from: impl std::io::Read + Send + 'static,
    within: Duration,
    want: impl Fn(&str) -> bool + Send + 'static,
) -> Option<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if !sent && want(line.trim()) {
                let _ = tx.send(line.trim().to_owned());
                sent = true;
            }
        }
    });
    rx.recv_timeout(within).ok()
}
