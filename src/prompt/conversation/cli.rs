//! What the release's `serve/cli.py` does around the templates: template choice from the model's name,
//! the image marker in the first message, the open reply slot, and the stop string.
use super::{template_by_name, Conversation};
use crate::prompt::image_tokens::{DEFAULT_IMAGE_TOKEN, DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN};
use crate::{Error, Result};

/// serve/cli.py's template for a model name (from [`model_name_from_path`]); the first match wins.
pub fn template_for_model_name(model_name: &str) -> &'static str {
    let name = model_name.to_lowercase();
    const RULES: [(&str, &str); 5] = [
        ("llama-2", "llava_llama_2"),
        ("mistral", "mistral_instruct"),
        ("v1.6-34b", "chatml_direct"),
        ("v1", "llava_v1"),
        ("mpt", "mpt"),
    ];
    RULES.iter().find(|(needle, _)| name.contains(needle)).map_or("llava_v0", |(_, template)| template)
}

/// The release's `get_model_name_from_path`: the last folder, prefixed by its parent for `checkpoint-*`.
pub fn model_name_from_path(model_path: &str) -> Result<String> {
    let parts: Vec<&str> = model_path.trim_matches('/').split('/').collect();
    let last = parts[parts.len() - 1]; // split always yields at least one part
    if !last.starts_with("checkpoint-") {
        return Ok(last.to_owned());
    }
    match parts.len().checked_sub(2).map(|i| parts[i]) {
        Some(parent) => Ok(format!("{parent}_{last}")),
        None => Err(Error::Prompt(format!("model path `{model_path}`: a checkpoint folder needs a parent folder"))),
    }
}

/// The template chosen by serve/cli.py: `--conv-mode` if given, else the one inferred from the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvModeChoice {
    pub inferred: &'static str,
    pub chosen: String,
}

impl ConvModeChoice {
    /// The release's warning when `--conv-mode` overrides a different inferred template.
    pub fn warning(&self) -> Option<String> {
        (self.chosen != self.inferred).then(|| {
            format!(
                "[WARNING] the auto inferred conversation mode is {}, while `--conv-mode` is {}, using {}",
                self.inferred, self.chosen, self.chosen
            )
        })
    }
}

pub fn resolve_conv_mode(model_name: &str, conv_mode_flag: Option<&str>) -> ConvModeChoice {
    let inferred = template_for_model_name(model_name);
    ConvModeChoice { inferred, chosen: conv_mode_flag.unwrap_or(inferred).to_owned() }
}

/// The roles serve/cli.py prints before each message (only for display, never in the prompt).
pub fn cli_display_roles(model_name: &str, conversation: &Conversation) -> [String; 2] {
    if model_name.to_lowercase().contains("mpt") {
        ["user".to_owned(), "assistant".to_owned()]
    } else {
        conversation.roles.clone()
    }
}

/// The CLI's user message: `<image>\n` (or `<im_start><image><im_end>\n` when the model's config sets
/// `mm_use_im_start_end`) in front of the text when it carries the image.
pub fn cli_user_message(text: &str, with_image: bool, mm_use_im_start_end: bool) -> String {
    match (with_image, mm_use_im_start_end) {
        (false, _) => text.to_owned(),
        (true, false) => format!("{DEFAULT_IMAGE_TOKEN}\n{text}"),
        (true, true) => {
            format!("{DEFAULT_IM_START_TOKEN}{DEFAULT_IMAGE_TOKEN}{DEFAULT_IM_END_TOKEN}\n{text}")
        }
    }
}

/// serve/cli.py's chat loop without the model: the image goes with the first user message, each turn
/// opens an empty assistant slot, and the reply fills it.
#[derive(Clone, Debug)]
pub struct CliChat {
    conversation: Conversation,
    image_pending: bool,
    /// Whether the last turn carried the image, so that undoing it gives the image back.
    last_turn_had_image: bool,
    mm_use_im_start_end: bool,
}

impl CliChat {
    pub fn new(conversation: Conversation, with_image: bool, mm_use_im_start_end: bool) -> Self {
        CliChat { conversation, image_pending: with_image, last_turn_had_image: false, mm_use_im_start_end }
    }

    /// Starts a chat the way serve/cli.py does for `model_path` and `--conv-mode`.
    pub fn for_model(
        model_path: &str,
        conv_mode_flag: Option<&str>,
        with_image: bool,
        mm_use_im_start_end: bool,
    ) -> Result<Self> {
        let choice = resolve_conv_mode(&model_name_from_path(model_path)?, conv_mode_flag);
        Ok(Self::new(template_by_name(&choice.chosen)?, with_image, mm_use_im_start_end))
    }

    /// Adds the user's message and an open reply slot; returns the prompt to generate from.
    /// On error the conversation is left as it was.
    pub fn prompt_for(&mut self, user_input: &str) -> Result<String> {
        if user_input.is_empty() {
            // The CLI ends the chat on empty input rather than sending it.
            return Err(Error::Prompt("empty user message".into()));
        }
        let text = cli_user_message(user_input, self.image_pending, self.mm_use_im_start_end);
        let [user, assistant] = self.conversation.roles.clone();
        self.conversation.append_message(&user, Some(&text));
        self.conversation.append_message(&assistant, None);
        match self.conversation.get_prompt() {
            Ok(prompt) => {
                self.last_turn_had_image = self.image_pending;
                self.image_pending = false;
                Ok(prompt)
            }
            Err(e) => {
                self.conversation.messages.truncate(self.conversation.messages.len() - 2);
                Err(e)
            }
        }
    }

    /// Stores the model's reply in the open slot. The release stores `tokenizer.decode(ids).strip()`,
    /// special tokens included; pass that text to reproduce its later prompts exactly.
    pub fn record_reply(&mut self, reply: &str) -> Result<()> {
        match self.conversation.messages.last() {
            Some(last) if last.text.is_none() => self.conversation.set_last_message_text(reply),
            _ => Err(Error::Prompt("no open reply slot: call prompt_for first".into())),
        }
    }

    /// Removes the last user message and its reply slot (a turn whose generation failed).
    pub fn undo_last_turn(&mut self) {
        let keep = self.conversation.messages.len().saturating_sub(2);
        self.conversation.messages.truncate(keep);
        self.image_pending |= std::mem::take(&mut self.last_turn_had_image);
    }

    pub fn stop_string(&self) -> Option<&str> {
        self.conversation.stop_string()
    }

    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }
}
