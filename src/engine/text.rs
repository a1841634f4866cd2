//! The answer's text as it grows: stop strings are found across token boundaries, and text that could
//! still become the start of a stop string is held back until it cannot.

#[derive(Debug)]
pub(crate) struct StopText {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    /// Where the first stop string starts, once one is found.
    stopped_at: Option<usize>,
}

impl StopText {
    /// Empty stop strings are ignored (they would match before any text).
    pub(crate) fn new(stops: &[String]) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self { stops, text: String::new(), released: 0, stopped_at: None }
    }

    /// Adds final text; returns what can be released now and whether a stop string was met.
    pub(crate) fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped_at.is_some() {
            return (String::new(), true);
        }
        self.text.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.stopped_at = Some(at);
            return (self.release_to(at), true);
        }
        let held = self.held_suffix_len();
        (self.release_to(self.text.len() - held), false)
    }

    /// Ends the text (no stop string can start any more): the rest that was held.
    pub(crate) fn finish(&mut self) -> String {
        let end = self.stopped_at.unwrap_or(self.text.len());
        self.release_to(end)
    }

    /// The longest end of the text that a stop string starts with (at a character boundary).
    fn held_suffix_len(&self) -> usize {
        let unreleased = &self.text[self.released..];
        unreleased
            .char_indices()
            .map(|(i, _)| &unreleased[i..])
            .find(|tail| self.stops.iter().any(|s| s.starts_with(tail)))
            .map_or(0, str::len)
    }

    fn release_to(&mut self, end: usize) -> String {
        let end = end.max(self.released);
        let out = self.text[self.released..end].to_string();
        self.released = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::StopText;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut text = StopText::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = Vec::new();
        let mut stopped = false;
        for piece in pieces {
            let (released, stop) = text.push(piece);
            out.push(released);
            if stop {
                stopped = true;
                break;
            }
        }
        out.push(text.finish());
        let all = out.concat();
        (out, stopped, all)
    }

    #[test]
    fn a_stop_string_across_pieces_is_found_and_trimmed() {
        let (out, stopped, all) = run(&["</s>"], &["Hello", " wor", "ld<", "/s", "> more"]);
        assert!(stopped);
        assert_eq!(all, "Hello world");
        assert_eq!(out, vec!["Hello", " wor", "ld", "", "", ""]);
    }

    #[test]
    fn held_text_that_does_not_become_a_stop_string_is_released() {
        let (out, stopped, all) = run(&["###"], &["a#", "#b", "c"]);
        assert!(!stopped);
        assert_eq!(all, "a##bc");
        assert_eq!(out, vec!["a", "##b", "c", ""]);
    }

    #[test]
    fn without_stop_strings_everything_is_released_at_once() {
        let (out, stopped, all) = run(&[""], &["é", "x"]);
        assert!(!stopped);
        assert_eq!(all, "éx");
        assert_eq!(out, vec!["é", "x", ""]);
    }
}
