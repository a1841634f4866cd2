# Regenerates the conversation-template prompts from the project's Python port and compares.
python parity/conversation_fixtures.py --check
