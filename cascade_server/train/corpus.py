"""A small labelled intent corpus generated in code (no download): the text demo's data.

Banking-style intents from templates with slot fillers, politeness and a little noise. Some
phrasings are shared between intents on purpose (a card that "is not working" may be lost or
declined), so a small student finds some queries hard and a larger teacher is worth asking.
"""

from __future__ import annotations

import numpy as np

INTENTS: dict[str, list[str]] = {
    "check_balance": [
        "not the exchange rate, just my {acct} balance",
        "i don't want to transfer, only to see my {acct} balance",
        "what is my {acct} balance",
        "how much money is in my {acct}",
        "show me my {acct} balance",
        "balance of my {acct} please",
        "how much do i have left in {acct}",
        "can you tell me what's in my {acct}",
    ],
    "lost_card": [
        "my {card} was not declined, i lost it",
        "it was not refused at {shop}, my {card} is gone",
        "i lost my {card}",
        "my {card} was stolen",
        "i can't find my {card} anywhere",
        "someone took my {card}",
        "my {card} is missing",
        "my {card} is not working",
    ],
    "card_declined": [
        "i did not lose my {card}, it was declined",
        "my {card} is not lost, it just got refused at {shop}",
        "my {card} was declined at {shop}",
        "why was my payment refused at {shop}",
        "{shop} would not accept my {card}",
        "the {card} got rejected at {shop}",
        "my {card} is not working at {shop}",
        "payment failed with my {card}",
    ],
    "transfer": [
        "this is not about a fee, i want to send {amount} to {person}",
        "no, not the exchange rate, i want to send {amount} to {person}",
        "send {amount} to {person}",
        "transfer {amount} from my {acct} to {person}",
        "i want to wire {amount} to {person}",
        "move {amount} to my {acct}",
        "pay {person} {amount}",
        "how do i send money to {person}",
    ],
    "exchange_rate": [
        "not a transfer, what do i get in {currency} for {amount}",
        "i do not want my balance, just the {currency} rate",
        "what is the exchange rate for {currency}",
        "how many {currency} do i get for {amount}",
        "convert {amount} to {currency}",
        "current {currency} rate",
        "is the {currency} rate good today",
        "how much is {amount} in {currency}",
    ],
    "change_address": [
        "i do not want a new account, i moved to {street}",
        "not opening anything, just update my address to {street}",
        "i moved and need to update my address",
        "change my address to {street}",
        "update the address on my {acct}",
        "my new address is {street}",
        "how do i change my home address",
        "i need to update my details, i moved to {street}",
    ],
    "open_account": [
        "i did not move, i want to open a {acct}",
        "not a new address, a new {acct} please",
        "i want to open a new {acct}",
        "how do i open a {acct}",
        "can i get a second {acct}",
        "sign me up for a {acct}",
        "open a {acct} for my child",
        "what do i need to open a {acct}",
    ],
    "fees": [
        "i don't want to send money, why was i charged {amount}",
        "not a transfer, what is the {amount} fee on my {acct}",
        "why was i charged a fee",
        "what is this {amount} charge on my {acct}",
        "there is a fee i don't recognise",
        "how much does a transfer cost",
        "was i charged for paying with my {card} at {shop}",
        "refund the fee on my {acct}",
    ],
}

SLOTS: dict[str, list[str]] = {
    "acct": ["account", "savings account", "current account", "checking account", "joint account"],
    "card": ["card", "debit card", "credit card", "visa", "mastercard", "bank card"],
    "shop": ["the supermarket", "a café", "amazon", "the petrol station", "ikea", "the pharmacy"],
    "amount": ["£50", "100 euros", "$20", "200 dollars", "€75", "1000 pounds", "30 quid"],
    "person": ["my mum", "john", "my landlord", "zoë", "the plumber", "my friend", "josé"],
    "currency": ["euros", "dollars", "yen", "pounds", "swiss francs", "rupees"],
    "street": ["12 high street", "5 rue de la paix", "42 baker street", "7 königstraße"],
}
PREFIXES = ["", "", "", "hi, ", "hello ", "please ", "hey, ", "excuse me, ", "quick question: "]
SUFFIXES = ["", "", "", "?", " please", " thanks", "!", " asap", " 🙏"]


def generate(n: int = 2400, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """n texts with labels (balanced), and the intent names in class-id order."""
    rng = np.random.default_rng(seed)
    names = list(INTENTS)
    texts, labels = [], []
    for i in range(n):
        label = i % len(names)
        template = INTENTS[names[label]][rng.integers(len(INTENTS[names[label]]))]
        text = template
        for slot, values in SLOTS.items():
            while "{" + slot + "}" in text:
                text = text.replace("{" + slot + "}", values[rng.integers(len(values))], 1)
        text = PREFIXES[rng.integers(len(PREFIXES))] + text + SUFFIXES[rng.integers(len(SUFFIXES))]
        if rng.random() < 0.25:  # a typo: drop one character
            k = int(rng.integers(len(text)))
            text = text[:k] + text[k + 1 :]
        if rng.random() < 0.3:
            text = text.capitalize()
        texts.append(text)
        labels.append(label)
    order = rng.permutation(n)
    return [texts[i] for i in order], [labels[i] for i in order], names
