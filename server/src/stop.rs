//! Stop sequences on streamed text.
//!
//! The engine notices a stop string one token late and streams the text of
//! the token that completes it, so text is filtered here: anything that could
//! still be the start of a stop string is held back until the next piece
//! shows whether it is, and everything from a stop string on is dropped.

#[derive(Debug, Clone)]
pub struct StopFilter {
    stops: Vec<String>,
    /// Text received but not released yet (a possible start of a stop string).
    pending: String,
    stopped: bool,
}

/// What one piece of text turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// Text that can go to the client now.
    pub text: String,
    /// A stop string was reached: the choice ends here.
    pub stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn push(&mut self, piece: &str) -> Filtered {
        if self.stopped {
            return Filtered {
                text: String::new(),
                stopped: true,
            };
        }
        self.pending.push_str(piece);
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min()
        {
            self.stopped = true;
            let text = self.pending[..cut].to_string();
            self.pending.clear();
            return Filtered {
                text,
                stopped: true,
            };
        }
        let keep = self.longest_partial_stop();
        let release = self.pending.len() - keep;
        let text = self.pending[..release].to_string();
        self.pending.drain(..release);
        Filtered {
            text,
            stopped: false,
        }
    }

    /// The generation ended without a stop string: release what was held back.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper
    /// prefix of a stop string (always on a char boundary).
    fn longest_partial_stop(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.pending.len());
            for len in (best + 1..=max).rev() {
                let start = self.pending.len() - len;
                if self.pending.is_char_boundary(start)
                    && stop.starts_with(&self.pending[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut filter = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let f = filter.push(piece);
            out.push_str(&f.text);
            if f.stopped {
                return (out, true);
            }
        }
        out.push_str(&filter.finish());
        (out, false)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        assert_eq!(run(&[], &["a", "b\n", "c"]), ("ab\nc".into(), false));
    }

    #[test]
    fn stop_split_over_pieces_is_never_released() {
        let mut filter = StopFilter::new(vec!["END".into()]);
        assert_eq!(filter.push("hello E").text, "hello ");
        assert_eq!(filter.push("N").text, "");
        let last = filter.push("D and more");
        assert_eq!(last.text, "");
        assert!(last.stopped);
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        assert_eq!(run(&["\n\n"], &["a\n", "b"]), ("a\nb".into(), false));
        assert_eq!(run(&["\n\n"], &["a\n"]), ("a\n".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["3", "2"], &["1 2 3"]), ("1 ".into(), true));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["éé"], &["caf", "é", "!"]), ("café!".into(), false));
        assert_eq!(run(&["éé"], &["café", "é!"]), ("caf".into(), true));
    }
}
