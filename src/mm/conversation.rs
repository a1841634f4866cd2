//! Conversation templates of the release (`arcana/conversation.py`).
