//! Frame ranges: the value of a `range` input (`1-100`, `1-100:2`, `1,3,5-9`), the
//! frames a render or a parameter sweep runs over. Parsed strictly, bounded before it
//! is expanded, and written back in one canonical form.

use std::fmt;

/// The most frames one range may hold, whatever a cluster allows: a bound on what a
/// task may ask the engine to track.
pub const MAX_FRAMES: u64 = 100_000;

/// The largest frame number (frames become parts of file names and job-array
/// indices, and must fit every scheduler's integer).
pub const MAX_FRAME: u32 = 999_999_999;

/// A validated frame range: pieces `a`, `a-b` or `a-b:s` (every `s`-th frame from `a`
/// up to `b`), in ascending order, none overlapping another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRange {
    pieces: Vec<Piece>,
    count: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    first: u32,
    last: u32,
    step: u32,
}

impl Piece {
    fn count(self) -> u64 {
        u64::from((self.last - self.first) / self.step) + 1
    }

    /// The last frame the piece really holds (`1-10:4` holds 1, 5, 9).
    fn end(self) -> u32 {
        self.first + (self.last - self.first) / self.step * self.step
    }
}

impl fmt::Display for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.end();
        match (end == self.first, self.step) {
            (true, _) => write!(f, "{}", self.first),
            (false, 1) => write!(f, "{}-{end}", self.first),
            (false, s) => write!(f, "{}-{end}:{s}", self.first),
        }
    }
}

impl FrameRange {
    /// Parses `text`: comma-separated pieces, each `N`, `N-M` or `N-M:S` (spaces
    /// around pieces are allowed). Refused, with the reason: anything else, `N > M`,
    /// a step of 0, numbers over [`MAX_FRAME`], pieces out of order or overlapping
    /// (a frame listed twice), and more than `limit` frames in all (at most
    /// [`MAX_FRAMES`]).
    pub fn parse(text: &str, limit: u64) -> Result<FrameRange, String> {
        let limit = limit.min(MAX_FRAMES);
        if text.trim().is_empty() {
            return Err("the frame range is empty; write frames like `1-100`, `1-100:2` or `1,3,5-9`".into());
        }
        let mut pieces: Vec<Piece> = Vec::new();
        let mut count: u64 = 0;
        for raw in text.split(',') {
            let item = raw.trim();
            let bad = |why: &str| {
                format!("`{}` is not a frame range piece: {why}; write `N`, `N-M` or `N-M:STEP`", item.escape_debug())
            };
            let (span, step) = match item.split_once(':') {
                Some((span, step)) => (span, Some(step)),
                None => (item, None),
            };
            let (first, last) = match span.split_once('-') {
                Some((a, b)) => {
                    (number(a).ok_or_else(|| bad("not a number"))?, number(b).ok_or_else(|| bad("not a number"))?)
                }
                None => {
                    let n = number(span).ok_or_else(|| bad("not a number"))?;
                    (n, n)
                }
            };
            let step = match step {
                Some(s) => number(s).ok_or_else(|| bad("the step is not a number"))?,
                None => 1,
            };
            if step == 0 {
                return Err(bad("the step is 0"));
            }
            if step != 1 && first == last && span.split_once('-').is_none() {
                return Err(bad("a step needs a span (`N-M:STEP`)"));
            }
            if first > last {
                return Err(bad(&format!("{first} is after {last}")));
            }
            let piece = Piece { first, last, step };
            // Kept ending at its last real frame, so equal ranges compare equal.
            let piece = Piece { last: piece.end(), ..piece };
            if let Some(prev) = pieces.last()
                && piece.first <= prev.end()
            {
                return Err(format!(
                    "`{}` does not come after `{prev}`: list the pieces in ascending order, each frame once",
                    item.escape_debug()
                ));
            }
            count += piece.count();
            if count > limit {
                return Err(format!("the range holds more than {limit} frames, the most allowed here"));
            }
            pieces.push(piece);
        }
        Ok(FrameRange { pieces, count })
    }

    /// How many frames it holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The frames, in ascending order.
    pub fn frames(&self) -> impl Iterator<Item = u32> + '_ {
        self.pieces.iter().flat_map(|p| (p.first..=p.end()).step_by(p.step as usize))
    }

    /// The range holding exactly `frames` (ascending, each once; none over
    /// [`MAX_FRAME`]), written with as few pieces as evenly spaced runs allow:
    /// `1,3,5,6,7,20` is `1-5:2,6-7,20`. `None` for no frames.
    pub fn from_frames(frames: &[u32]) -> Option<FrameRange> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut i = 0;
        while i < frames.len() {
            let first = frames[i];
            let mut piece = Piece { first, last: first, step: 1 };
            if let Some(&next) = frames.get(i + 1) {
                let step = next - first;
                let mut j = i + 1;
                while frames.get(j + 1).is_some_and(|&f| f - frames[j] == step) {
                    j += 1;
                }
                // A run of two is two single frames, unless they are neighbours.
                if j > i + 1 || step == 1 {
                    piece = Piece { first, last: frames[j], step };
                    i = j;
                }
            }
            pieces.push(piece);
            i += 1;
        }
        let count = pieces.iter().map(|p| p.count()).sum();
        (!pieces.is_empty()).then_some(FrameRange { pieces, count })
    }

    /// Whether `frame` is one of its frames.
    pub fn contains(&self, frame: u32) -> bool {
        self.pieces.iter().any(|p| frame >= p.first && frame <= p.end() && (frame - p.first).is_multiple_of(p.step))
    }

    /// The smallest and largest frame.
    pub fn bounds(&self) -> (u32, u32) {
        let first = self.pieces.first().map_or(0, |p| p.first);
        let last = self.pieces.last().map_or(0, |p| p.end());
        (first, last)
    }
}

impl fmt::Display for FrameRange {
    /// The canonical form: pieces joined by `,`, each ending at its last real frame.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.pieces.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Digits only (no sign, no spaces), at most [`MAX_FRAME`].
fn number(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|n| *n <= MAX_FRAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(text: &str) -> Vec<u32> {
        FrameRange::parse(text, MAX_FRAMES).unwrap().frames().collect()
    }

    #[test]
    fn the_three_forms_expand_to_their_frames_and_print_canonically() {
        assert_eq!(frames("1-5"), [1, 2, 3, 4, 5]);
        assert_eq!(frames("1-10:4"), [1, 5, 9]);
        assert_eq!(frames("1,3,5-9"), [1, 3, 5, 6, 7, 8, 9]);
        assert_eq!(frames("0"), [0]);
        let r = FrameRange::parse(" 1-10:4 , 12 ,20-21", 100).unwrap();
        assert_eq!(r.to_string(), "1-9:4,12,20-21");
        assert_eq!((r.count(), r.bounds()), (6, (1, 21)));
        assert_eq!(FrameRange::parse(&r.to_string(), 100).unwrap(), r, "the canonical form reads back the same");
    }

    #[test]
    fn a_set_of_frames_is_written_back_with_few_pieces_and_reads_back_the_same() {
        for list in [vec![1, 3, 5, 6, 7, 20], vec![4], vec![1, 2], vec![1, 5], vec![2, 4, 6, 8, 9, 10, 11, 30, 40, 50]]
        {
            let r = FrameRange::from_frames(&list).unwrap();
            assert_eq!(r.frames().collect::<Vec<_>>(), list, "{r}");
            assert_eq!(r.count(), list.len() as u64);
            assert_eq!(FrameRange::parse(&r.to_string(), MAX_FRAMES).unwrap(), r, "{r}");
            assert!(list.iter().all(|f| r.contains(*f)) && !r.contains(99) && !r.contains(0), "{r}");
        }
        assert_eq!(FrameRange::from_frames(&[1, 3, 5, 6, 7, 20]).unwrap().to_string(), "1-5:2,6-7,20");
        assert_eq!(FrameRange::from_frames(&(1..=1000).step_by(2).collect::<Vec<_>>()).unwrap().to_string(), "1-999:2");
        assert!(FrameRange::from_frames(&[]).is_none());
    }

    #[test]
    fn malformed_reversed_overlapping_and_oversized_ranges_are_refused_with_the_reason() {
        for (text, words) in [
            ("", "is empty"),
            ("1-", "not a number"),
            ("-3", "not a number"),
            ("a-b", "not a number"),
            ("1-10:0", "the step is 0"),
            ("5:2", "a step needs a span"),
            ("10-1", "10 is after 1"),
            ("1-10,5", "does not come after `1-10`"),
            ("5,1", "does not come after `5`"),
            ("1;rm -rf /", "not a number"),
            ("1-1000000000", "not a number"),
            ("1,,2", "not a number"),
        ] {
            let err = FrameRange::parse(text, MAX_FRAMES).expect_err(text);
            assert!(err.contains(words), "{text:?}: {err}");
        }
        // Bounded before anything is expanded, by the limit given and by MAX_FRAMES.
        assert!(FrameRange::parse("1-11", 10).unwrap_err().contains("more than 10 frames"));
        assert!(FrameRange::parse("0-999999999", u64::MAX).unwrap_err().contains(&format!("more than {MAX_FRAMES}")));
        assert_eq!(FrameRange::parse("1-10", 10).unwrap().count(), 10);
    }
}
