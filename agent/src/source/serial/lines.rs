//! Bytes from a serial port cut into lines, whatever comes down the wire.
//!
//! - A line ends at `\n`; a `\r` before it is dropped; an empty line is no line.
//! - A line longer than `max` bytes (garbage at a wrong baud rate that never holds a
//!   newline, a device that went mad) is not kept growing: its bytes are dropped up to
//!   the next newline and it is reported once, as [`Piece::TooLong`].
//! - Bytes left without their newline when the port closes are a line cut by the
//!   unplugging: [`Lines::close`] reports them as [`Piece::Cut`].
//! - After the port opens, the first line may be the tail of one the device was printing
//!   (its first bytes came at once): [`Lines::skip_first`] drops it, as [`Piece::Cut`].
//! - Pure: no I/O, no clock; the port reader feeds it.

/// What the splitter found.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A whole line, without its `\r\n`; not checked for UTF-8.
    Line(&'a [u8]),
    /// A line over the limit, dropped: at least this many bytes of it.
    TooLong(usize),
    /// A line cut by the port closing or opening, dropped: this many bytes of it.
    Cut(usize),
}

/// The line being gathered.
#[derive(Debug)]
pub struct Lines {
    buf: Vec<u8>,
    max: usize,
    /// Dropping bytes up to the next newline (a line over `max`).
    overflow: bool,
    /// Dropping the first line after the port opened.
    skipping: bool,
}

impl Lines {
    /// A splitter keeping lines of at most `max` bytes.
    pub fn new(max: usize) -> Lines {
        Lines {
            buf: Vec::new(),
            max,
            overflow: false,
            skipping: false,
        }
    }

    /// Drops the bytes up to the next newline: the first line after the port opened,
    /// when it may be the tail of a line.
    pub fn skip_first(&mut self) {
        self.skipping = true;
    }

    /// Cuts `bytes` into lines, calling `each` for every piece found.
    pub fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(Piece<'_>)) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let (part, rest, ended) = match newline {
                Some(at) => (&bytes[..at], &bytes[at + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if self.overflow {
                if ended {
                    self.overflow = false;
                }
                continue;
            }
            if self.skipping {
                self.buf.extend_from_slice(part);
                if ended {
                    self.skipping = false;
                    let cut = trimmed(&self.buf).len();
                    self.buf.clear();
                    if cut > 0 {
                        each(Piece::Cut(cut));
                    }
                }
                continue;
            }
            if self.buf.len() + part.len() > self.max + usize::from(part.ends_with(b"\r")) {
                let seen = self.buf.len() + part.len();
                self.buf.clear();
                self.overflow = !ended;
                each(Piece::TooLong(seen));
                continue;
            }
            if !ended {
                self.buf.extend_from_slice(part);
                continue;
            }
            if self.buf.is_empty() {
                let line = trimmed(part);
                if !line.is_empty() {
                    each(Piece::Line(line));
                }
            } else {
                self.buf.extend_from_slice(part);
                let line = trimmed(&self.buf);
                if !line.is_empty() {
                    each(Piece::Line(line));
                }
                self.buf.clear();
            }
        }
    }

    /// The port closed: what was gathered of a line is dropped and reported.
    pub fn close(&mut self) -> Option<Piece<'static>> {
        let cut = trimmed(&self.buf).len();
        self.buf.clear();
        let dropping = std::mem::take(&mut self.overflow) || std::mem::take(&mut self.skipping);
        (cut > 0 && !dropping).then_some(Piece::Cut(cut))
    }
}

/// A line without its trailing `\r` (and `\0`s some adapters send on opening).
fn trimmed(line: &[u8]) -> &[u8] {
    let mut line = line;
    while let [rest @ .., b'\r' | b'\0'] = line {
        line = rest;
    }
    while let [b'\0', rest @ ..] = line {
        line = rest;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What feeding `chunks` one after the other gives, as text.
    fn pieces(lines: &mut Lines, chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        for chunk in chunks {
            lines.feed(chunk, |piece| {
                out.push(match piece {
                    Piece::Line(l) => String::from_utf8_lossy(l).into_owned(),
                    Piece::TooLong(n) => format!("<too long: {n}>"),
                    Piece::Cut(n) => format!("<cut: {n}>"),
                })
            });
        }
        out
    }

    #[test]
    fn lines_end_at_newlines_across_reads_and_lose_their_carriage_return() {
        let mut lines = Lines::new(64);
        let got = pieces(&mut lines, &[b"1 2\r\n3 ", b"4\r", b"\n\r\n\n5", b" 6\n"]);
        assert_eq!(got, ["1 2", "3 4", "5 6"]);
        assert_eq!(lines.close(), None);
    }

    #[test]
    fn a_line_over_the_limit_is_dropped_up_to_its_newline_and_reported_once() {
        let mut lines = Lines::new(8);
        let garbage = [0xffu8; 30];
        let got = pieces(
            &mut lines,
            &[
                b"12345678\r\n",
                &garbage,
                &garbage,
                b"xx\nok\n",
                b"123456789\nok2\n",
            ],
        );
        assert_eq!(
            got,
            ["12345678", "<too long: 30>", "ok", "<too long: 9>", "ok2"]
        );
    }

    #[test]
    fn a_line_cut_by_the_port_closing_is_reported_not_kept() {
        let mut lines = Lines::new(64);
        assert_eq!(pieces(&mut lines, &[b"1 2\n3 4"]), ["1 2"]);
        assert_eq!(lines.close(), Some(Piece::Cut(3)));
        // The next opening starts clean.
        assert_eq!(pieces(&mut lines, &[b"5 6\n"]), ["5 6"]);
        assert_eq!(lines.close(), None);
    }

    #[test]
    fn the_first_line_after_opening_is_dropped_when_asked() {
        let mut lines = Lines::new(64);
        lines.skip_first();
        assert_eq!(
            pieces(&mut lines, &[b"PO2=97", b"%\r\n1 2\n"]),
            ["<cut: 7>", "1 2"]
        );
        // A newline first: nothing was cut.
        lines.skip_first();
        assert_eq!(pieces(&mut lines, &[b"\r\n3 4\n"]), ["3 4"]);
    }
}
