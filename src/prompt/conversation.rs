//! Conversation templates of the release (`arcana/conversation.py`): the same prompt strings, the same
//! stop strings, and errors where the release raises (a `None` separator, a bad first Llama-2 message).
mod cli;
mod templates;

use std::borrow::Cow;

pub use cli::{
    cli_display_roles, cli_user_message, model_name_from_path, resolve_conv_mode, template_for_model_name, CliChat,
    ConvModeChoice,
};
pub use templates::{template_by_name, TEMPLATE_NAMES};

use crate::prompt::image_tokens::DEFAULT_IMAGE_TOKEN;
use crate::{Error, Result};

/// How messages are joined (`SeparatorStyle` of the release).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeparatorStyle {
    /// `system sep role: text sep ...`
    Single,
    /// Like `Single`, but user messages end with `sep` and assistant messages with `sep2`.
    Two,
    /// ChatML-like: `system sep roletext sep ...`, roles carry their own markup.
    Mpt,
    /// Texts only, no roles: user messages end with `sep`, assistant messages with `sep2`.
    Plain,
    /// `[INST] ... [/INST]` blocks, the system prompt wrapped in `<<SYS>>` inside the first one.
    Llama2,
}

/// One message. `text: None` is the slot the model is about to fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub text: Option<String>,
    /// The web UI's `(text, image, mode)` form: the prompt moves the image marker to the front of the
    /// first message. The CLI instead writes `<image>\n` into the text and leaves this false.
    pub image: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub system: String,
    /// (user, assistant)
    pub roles: [String; 2],
    pub messages: Vec<Message>,
    pub sep_style: SeparatorStyle,
    pub sep: String,
    pub sep2: Option<String>,
    /// Only "mmtag" inside it changes the prompt (image shown as a separate exchange).
    pub version: String,
}

/// A message as the renderers see it: `None` where the release finds the message falsy.
type Turn<'a> = (&'a str, Option<Cow<'a, str>>);

impl Conversation {
    pub fn append_message(&mut self, role: &str, text: Option<&str>) {
        self.messages.push(Message { role: role.to_owned(), text: text.map(str::to_owned), image: false });
    }

    /// The web UI's way to attach an image to a message (see [`Message::image`]).
    pub fn append_message_with_image(&mut self, role: &str, text: &str) {
        self.messages.push(Message { role: role.to_owned(), text: Some(text.to_owned()), image: true });
    }

    /// Fills the last message, as the CLI does with the model's reply (`conv.messages[-1][-1] = outputs`).
    pub fn set_last_message_text(&mut self, text: &str) -> Result<()> {
        let last = self.messages.last_mut().ok_or_else(|| Error::Prompt("no message to put the reply in".into()))?;
        last.text = Some(text.to_owned());
        Ok(())
    }

    /// The string whose appearance ends a reply (serve/cli.py): `sep`, or `sep2` for [`SeparatorStyle::Two`].
    /// It can be empty (`mistral_instruct`).
    pub fn stop_string(&self) -> Option<&str> {
        match self.sep_style {
            SeparatorStyle::Two => self.sep2.as_deref(),
            _ => Some(&self.sep),
        }
    }

    /// The release's `get_prompt()`.
    pub fn get_prompt(&self) -> Result<String> {
        let turns = self.turns();
        match self.sep_style {
            SeparatorStyle::Single => Ok(self.render_with_roles(&turns, ": ", ":", |_| Some(&self.sep))),
            SeparatorStyle::Two => self.render_two(&turns),
            SeparatorStyle::Mpt => Ok(self.render_with_roles(&turns, "", "", |_| Some(&self.sep))),
            SeparatorStyle::Plain => self.render_plain(&turns),
            SeparatorStyle::Llama2 => self.render_llama_2(&turns),
        }
    }

    fn sep_after(&self, index: usize) -> Option<&str> {
        if index.is_multiple_of(2) {
            Some(&self.sep)
        } else {
            self.sep2.as_deref()
        }
    }

    fn missing_sep2(index: usize) -> Error {
        // The release raises TypeError here (`str + None`).
        Error::Prompt(format!("message {index} needs `sep2`, which this template does not have"))
    }

    fn turns(&self) -> Vec<Turn<'_>> {
        let mut turns: Vec<Turn<'_>> = self
            .messages
            .iter()
            .map(|m| {
                let text = match m.text.as_deref() {
                    // a (text, image, mode) tuple is truthy even when its text is empty
                    t if m.image => Some(Cow::Borrowed(t.unwrap_or(""))),
                    Some(t) if !t.is_empty() => Some(Cow::Borrowed(t)),
                    _ => None,
                };
                (m.role.as_str(), text)
            })
            .collect();
        let Some(first) = self.messages.first().filter(|m| m.image) else {
            return turns;
        };
        let without_marker = first.text.as_deref().unwrap_or("").replace(DEFAULT_IMAGE_TOKEN, "");
        let bare = strip_python_whitespace(&without_marker).to_owned();
        if self.version.contains("mmtag") {
            turns[0] = (first.role.as_str(), (!bare.is_empty()).then_some(Cow::Owned(bare)));
            let shown = [
                (self.roles[0].as_str(), Some(Cow::Borrowed("<Image><image></Image>"))),
                (self.roles[1].as_str(), Some(Cow::Borrowed("Received."))),
            ];
            turns.splice(0..0, shown);
        } else {
            turns[0] = (first.role.as_str(), Some(Cow::Owned(format!("{DEFAULT_IMAGE_TOKEN}\n{bare}"))));
        }
        turns
    }

    /// Single and Mpt: `role + colon + text + sep`, or `role + open` for an empty slot.
    fn render_with_roles<'s>(
        &'s self,
        turns: &[Turn<'_>],
        colon: &str,
        open: &str,
        sep: impl Fn(usize) -> Option<&'s str>,
    ) -> String {
        let mut out = format!("{}{}", self.system, self.sep);
        for (i, (role, text)) in turns.iter().enumerate() {
            out.push_str(role);
            match text {
                Some(text) => {
                    out.push_str(colon);
                    out.push_str(text);
                    out.push_str(sep(i).unwrap_or_default());
                }
                None => out.push_str(open),
            }
        }
        out
    }

    fn render_two(&self, turns: &[Turn<'_>]) -> Result<String> {
        if let Some(i) = turns.iter().enumerate().position(|(i, (_, t))| t.is_some() && self.sep_after(i).is_none()) {
            return Err(Self::missing_sep2(i));
        }
        Ok(self.render_with_roles(turns, ": ", ":", |i| self.sep_after(i)))
    }

    fn render_plain(&self, turns: &[Turn<'_>]) -> Result<String> {
        let mut out = self.system.clone();
        for (i, (_, text)) in turns.iter().enumerate() {
            if let Some(text) = text {
                let sep = self.sep_after(i).ok_or_else(|| Self::missing_sep2(i))?;
                out.push_str(text);
                out.push_str(sep);
            }
        }
        Ok(out)
    }

    fn render_llama_2(&self, turns: &[Turn<'_>]) -> Result<String> {
        match turns.first() {
            Some((_, None)) => return Err(Error::Prompt("the first message must have text (Llama-2 style)".into())),
            Some((role, _)) if *role != self.roles[0] => {
                return Err(Error::Prompt(format!(
                    "the first message must come from `{}`, not `{role}` (Llama-2 style)",
                    self.roles[0]
                )))
            }
            _ => {}
        }
        let mut out = String::new();
        for (i, (_, text)) in turns.iter().enumerate() {
            let Some(text) = text else { continue };
            if i % 2 == 0 {
                let system = if i == 0 && !self.system.is_empty() {
                    format!("<<SYS>>\n{}\n<</SYS>>\n\n", self.system)
                } else {
                    String::new()
                };
                out.push_str(&format!("{}[INST] {system}{text} [/INST]", self.sep));
            } else {
                let sep2 = self.sep2.as_deref().ok_or_else(|| Self::missing_sep2(i))?;
                out.push_str(&format!(" {text} {sep2}"));
            }
        }
        // Python's `str.lstrip(sep)` removes any leading characters that occur in `sep`.
        Ok(out.trim_start_matches(|c| self.sep.contains(c)).to_owned())
    }
}

/// Python's `str.strip()`: Rust's whitespace plus the separators U+001C..U+001F.
pub fn strip_python_whitespace(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}
