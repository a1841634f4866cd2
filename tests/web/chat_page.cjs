// Drives the chat page of `arcana-serve web` in headless Chromium (playwright-core, /usr/bin/chromium):
// upload an image, ask, watch the answer stream, regenerate, vote, ask again, flag, clear.
// Usage: node chat_page.cjs URL IMAGE [SCREENSHOT_DIR]; env ARCANA_PLAYWRIGHT = playwright-core's folder.
// Prints one JSON line with what it saw; exits non-zero with the reason when a step fails.
"use strict";
const { chromium } = require(process.env.ARCANA_PLAYWRIGHT || "playwright-core");
const fs = require("fs");
const path = require("path");

const [url, imagePath, screenshotDir] = process.argv.slice(2);
const CURSOR = "\u258c";
const STEP_MS = 60000;

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function lastAnswer(page) {
  return page.evaluate(() => {
    const bots = document.querySelectorAll("#chatbot .message.bot");
    const last = bots[bots.length - 1];
    return last ? { text: last.textContent, error: last.classList.contains("error") } : null;
  });
}

// Waits until the answer has finished streaming (Regenerate is enabled again).
async function waitAnswered(page) {
  await page.waitForFunction(() => !document.getElementById("regenerate").disabled, null, { timeout: STEP_MS });
  const answer = await lastAnswer(page);
  check(answer && !answer.error, `the answer is an error: ${answer && answer.text}`);
  check(answer.text.length > 0 && !answer.text.endsWith("\u258c"), `unfinished answer: ${answer.text}`);
  return answer.text;
}

async function shot(page, name) {
  if (!screenshotDir) return;
  fs.mkdirSync(screenshotDir, { recursive: true });
  await page.screenshot({ path: path.join(screenshotDir, name) });
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.ARCANA_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const seen = {};
  try {
    const page = await browser.newPage({ viewport: { width: 1180, height: 820 } });
    page.on("pageerror", (e) => { seen.pageError = String(e); });
    await page.goto(url);
    // The model list arrives (it is fetched again while the worker is still loading).
    await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0, null, { timeout: STEP_MS });
    seen.models = await page.$$eval("#model option", (options) => options.map((o) => o.value));
    seen.examples = await page.$$eval(".example", (buttons) => buttons.map((b) => b.textContent));
    await shot(page, "serving-page.png");

    // Greedy and short, so that regenerating gives the same text.
    await page.evaluate(() => {
      document.getElementById("temperature").value = "0";
      document.getElementById("max-tokens").value = "64";
    });
    // Record every text the answer shows, to see it stream.
    await page.evaluate(() => {
      window.answerTexts = [];
      new MutationObserver(() => {
        const bots = document.querySelectorAll("#chatbot .message.bot");
        if (bots.length) window.answerTexts.push(bots[bots.length - 1].textContent);
      }).observe(document.getElementById("chatbot"), { childList: true, subtree: true, characterData: true });
    });

    await page.setInputFiles("#image-input", imagePath);
    await page.waitForSelector("#image-preview:not([hidden])");
    await page.fill("#textbox", "What is in this image?");
    await page.click("#send");
    seen.first = await waitAnswered(page);
    const texts = await page.evaluate(() => window.answerTexts);
    seen.streamedWithCursor = texts.filter((t) => t.endsWith(CURSOR)).length;
    seen.distinctTexts = new Set(texts).size;
    check(seen.streamedWithCursor >= 2, `the answer did not stream: ${JSON.stringify(texts)}`);
    seen.userImageShown = await page.$eval("#chatbot .message.user img", (img) => img.naturalWidth > 0);
    seen.userText = await page.$eval("#chatbot .message.user", (m) => m.textContent);
    check(!seen.userText.includes("<image>"), `the marker is shown: ${seen.userText}`);
    check(await page.$eval("#image-preview", (img) => img.hidden), "the upload box was not emptied after sending");

    await page.click("#regenerate");
    seen.regenerated = await waitAnswered(page);
    check(seen.regenerated === seen.first, `greedy regenerate differs: ${seen.first} / ${seen.regenerated}`);
    check((await page.$$("#chatbot .message.bot")).length === 1, "regenerate added an answer instead of replacing it");

    await page.click("#upvote");
    await page.waitForFunction(() => document.getElementById("upvote").disabled && document.getElementById("flag").disabled);

    await page.fill("#textbox", "Describe the colours.");
    await page.press("#textbox", "Enter");
    seen.second = await waitAnswered(page);
    check((await page.$$("#chatbot .message.bot")).length === 2, "the second question did not continue the conversation");
    await shot(page, "serving-chat.png");
    await page.click("#downvote");
    await page.waitForFunction(() => document.getElementById("downvote").disabled);
    // A vote disables the three vote buttons (as the release); flag the first exchange after asking again.
    await page.fill("#textbox", "Anything else?");
    await page.click("#send");
    seen.third = await waitAnswered(page);
    await page.click("#flag");
    await page.waitForFunction(() => document.getElementById("flag").disabled);

    await page.click("#clear");
    await page.waitForFunction(() => document.querySelectorAll("#chatbot .message").length === 0);
    seen.clearedButtonsDisabled = await page.$$eval("#buttons button", (bs) => bs.every((b) => b.disabled));
    check(seen.clearedButtonsDisabled, "buttons stay enabled after Clear");
    check(!seen.pageError, `page error: ${seen.pageError}`);
    console.log(JSON.stringify(seen));
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(`browser test failed: ${e.message}`);
  process.exit(1);
});
